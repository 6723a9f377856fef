import { promises as fs } from 'node:fs';
import path from 'node:path';

/** `.NAME.PID.MS.tmp` beside NAME: the temporary file of an atomic write in progress (or of one a crash cut short). */
const TEMP_FILE = /^\..+\.\d+\.\d+\.tmp$/;

export function tempFileFor(file: string): string {
  return path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.${Date.now()}.tmp`);
}

export function isTempFile(name: string): boolean {
  return TEMP_FILE.test(name);
}

/**
 * Replace a file atomically and durably: write a temp file, fsync it, rename, fsync the directory.
 * A write that fails (a full filesystem, say) removes its temp file: a retry loop leaves none behind.
 */
export async function writeFileDurable(file: string, data: string | Buffer): Promise<void> {
  const dir = path.dirname(file);
  await fs.mkdir(dir, { recursive: true });
  const tmp = tempFileFor(file);
  try {
    const fh = await fs.open(tmp, 'w');
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
  const dh = await fs.open(dir, 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

export async function readJsonIfExists<T>(file: string): Promise<T | null> {
  try {
    return JSON.parse(await fs.readFile(file, 'utf8')) as T;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/**
 * Removes the temp files of atomic writes under `root` that are older than `olderThanMs` (an atomic
 * write takes milliseconds: an old one was cut short by a crash). Returns the files removed.
 */
export async function sweepTempFiles(root: string, olderThanMs: number): Promise<string[]> {
  const removed: string[] = [];
  const cutoff = Date.now() - olderThanMs;
  const walk = async (dir: string): Promise<void> => {
    const entries = await fs.readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const e of entries) {
      const file = path.join(dir, e.name);
      if (e.isDirectory()) {
        await walk(file);
      } else if (e.isFile() && isTempFile(e.name)) {
        const st = await fs.stat(file).catch(() => null);
        if (st && st.mtimeMs < cutoff) {
          await fs.rm(file, { force: true });
          removed.push(file);
        }
      }
    }
  };
  await walk(root);
  return removed;
}
