// Persistent bitmaps on disk: bitmaps/<name>.json. While a VM process runs, the file says "in-use"
// (and holds no bits); a clean stop writes the bits and "clean". A file still "in-use" at the next
// start means the process died without saving: the bitmap may have missed writes and is loaded invalid.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readJson, writeFileAtomic } from './vm-files';

export interface StoredBitmap {
  format: 'ferry-bitmap';
  version: 1;
  name: string;
  blockBytes: number;
  sizeBytes: number;
  state: 'in-use' | 'clean';
  /** Base64 of the bits (LSB first), only when clean. */
  bits?: string;
  savedAt: string;
}

export type LoadedBitmap =
  | { name: string; blockBytes: number; valid: true; bits: Buffer }
  | { name: string; blockBytes: number | null; valid: false; reason: string };

export const BITMAP_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

const fileOf = (dir: string, name: string): string => path.join(dir, `${name}.json`);

export function writeInUse(dir: string, name: string, blockBytes: number, sizeBytes: number): void {
  fs.mkdirSync(dir, { recursive: true });
  const rec: StoredBitmap = { format: 'ferry-bitmap', version: 1, name, blockBytes, sizeBytes, state: 'in-use', savedAt: new Date().toISOString() };
  writeFileAtomic(fileOf(dir, name), JSON.stringify(rec));
}

export function writeClean(dir: string, name: string, blockBytes: number, sizeBytes: number, bits: Buffer): void {
  fs.mkdirSync(dir, { recursive: true });
  const rec: StoredBitmap = {
    format: 'ferry-bitmap',
    version: 1,
    name,
    blockBytes,
    sizeBytes,
    state: 'clean',
    bits: bits.toString('base64'),
    savedAt: new Date().toISOString(),
  };
  writeFileAtomic(fileOf(dir, name), JSON.stringify(rec));
}

export function removeStored(dir: string, name: string): void {
  fs.rmSync(fileOf(dir, name), { force: true });
}

/** Every persistent bitmap of the VM, valid only if it was saved by a clean stop for this disk size. */
export function loadAll(dir: string, sizeBytes: number): LoadedBitmap[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter((f) => f.endsWith('.json'));
  } catch {
    return [];
  }
  const out: LoadedBitmap[] = [];
  for (const file of names) {
    const name = file.slice(0, -'.json'.length);
    if (!BITMAP_NAME.test(name)) continue;
    let rec: StoredBitmap | null = null;
    try {
      rec = readJson<StoredBitmap>(path.join(dir, file));
    } catch {
      rec = null;
    }
    const blockBytes = rec && typeof rec.blockBytes === 'number' ? rec.blockBytes : null;
    if (!rec || rec.format !== 'ferry-bitmap') {
      out.push({ name, blockBytes, valid: false, reason: 'the bitmap file is unreadable' });
    } else if (rec.sizeBytes !== sizeBytes) {
      out.push({ name, blockBytes, valid: false, reason: `saved for a ${rec.sizeBytes}-byte disk, the disk is ${sizeBytes}` });
    } else if (rec.state !== 'clean' || typeof rec.bits !== 'string') {
      out.push({ name, blockBytes, valid: false, reason: 'the VM process stopped uncleanly while tracking' });
    } else {
      out.push({ name, blockBytes: rec.blockBytes, valid: true, bits: Buffer.from(rec.bits, 'base64') });
    }
  }
  return out;
}
