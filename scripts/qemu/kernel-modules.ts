// Which kernel modules the guest's initramfs needs, in load order: the wanted ones and everything
// they depend on (each module's own `depends=` in its .modinfo section; Debian's package ships no
// modules.dep, depmod makes it at install time), less those built into the kernel.
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';

/** virtio_pci finds the devices, virtio_blk is /dev/vda. */
export const GUEST_MODULES = ['virtio_pci', 'virtio_blk'];

export interface KernelModule {
  name: string;
  file: string;
}

const normalize = (name: string): string => name.replace(/-/g, '_');

/** The modules to insmod, dependencies first. Throws naming a wanted module that is neither built in nor there. */
export async function modulesToLoad(modulesDir: string, wanted: readonly string[] = GUEST_MODULES): Promise<KernelModule[]> {
  const files = new Map<string, string>();
  for (const file of await walk(path.join(modulesDir, 'kernel'))) {
    const base = path.basename(file);
    if (base.endsWith('.ko')) files.set(normalize(base.slice(0, -3)), file);
    else if (/\.ko\.(xz|zst|gz)$/.test(base)) files.set(normalize(base.replace(/\.ko\..*$/, '')), file);
  }
  const builtin = new Set(
    (await fsp.readFile(path.join(modulesDir, 'modules.builtin'), 'utf8').catch(() => ''))
      .split('\n')
      .filter(Boolean)
      .map((line) => normalize(path.basename(line).replace(/\.ko$/, ''))),
  );
  const order: KernelModule[] = [];
  const seen = new Set<string>();
  const visit = async (name: string, neededBy: string | null): Promise<void> => {
    if (seen.has(name) || builtin.has(name)) return;
    seen.add(name);
    const file = files.get(name);
    if (!file) throw new Error(`kernel module ${name}${neededBy ? ` (needed by ${neededBy})` : ''} is neither built in nor in ${modulesDir}`);
    if (!file.endsWith('.ko')) throw new Error(`${file} is compressed and busybox insmod loads only plain .ko files: use a kernel with uncompressed modules`);
    for (const dep of moduleDepends(await fsp.readFile(file))) await visit(normalize(dep), name);
    order.push({ name, file });
  };
  for (const name of wanted) await visit(normalize(name), null);
  return order;
}

/** The `depends=` entry of a module's .modinfo strings (NUL-separated key=value). */
export function moduleDepends(ko: Buffer): string[] {
  const key = Buffer.from('\0depends=');
  const at = ko.indexOf(key);
  if (at < 0) return [];
  const start = at + key.length;
  const value = ko.toString('latin1', start, ko.indexOf(0, start));
  return value.split(',').filter(Boolean);
}

async function walk(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await fsp.readdir(dir, { withFileTypes: true }).catch(() => [])) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await walk(full)));
    else if (entry.isFile()) out.push(full);
  }
  return out;
}
