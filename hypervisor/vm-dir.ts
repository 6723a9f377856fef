// Removing a VM's directory, for both drivers.
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

/**
 * Removes the directory of a VM (`<home>/vms/<vm>`), or with `keepDisk` everything in it but its disk
 * image. The directory is first moved out of `vms/` (to `<home>/.removing/`), so that a late write of
 * its dying processes (the crash watch's exit record, say) finds no directory instead of recreating a
 * file under the VM's name.
 */
export async function removeVmDir(dir: string, opts: { keepDisk?: boolean } = {}): Promise<void> {
  if (opts.keepDisk) {
    for (const f of await fsp.readdir(dir).catch(() => [] as string[])) if (f !== 'disk.img') await fsp.rm(path.join(dir, f), { recursive: true, force: true });
    return;
  }
  const trash = path.join(path.dirname(path.dirname(dir)), '.removing');
  await fsp.mkdir(trash, { recursive: true });
  const away = path.join(trash, `${path.basename(dir)}-${randomBytes(4).toString('hex')}`);
  try {
    await fsp.rename(dir, away);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  await fsp.rm(away, { recursive: true, force: true });
}
