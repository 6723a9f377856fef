// A Unix socket path must fit in ~107 bytes. A socket in a long directory is addressed through a
// short symlink to the directory in the temp dir (every process computes the same name).
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const MAX_SOCKET_PATH = 100;

export function socketPath(dir: string, name: string): string {
  const direct = path.join(dir, name);
  if (Buffer.byteLength(direct) <= MAX_SOCKET_PATH) return direct;
  const target = path.resolve(dir);
  const link = path.join(os.tmpdir(), `ferry-${createHash('sha256').update(target).digest('hex').slice(0, 16)}`);
  try {
    if (fs.readlinkSync(link) !== target) fs.rmSync(link, { force: true });
  } catch {
    // absent
  }
  try {
    fs.symlinkSync(target, link);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  }
  return path.join(link, name);
}
