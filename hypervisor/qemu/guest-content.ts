// The content of a block on the disk of Ferry's QEMU guest: a pure function of (VM seed, block,
// version), the same as guest/ferry-guest.c computes (guest/PROTOCOL.md, "Block content").
// Version 0 is all zeros (never written). Any other version is the simulator's xorshift128 stream
// under a header that names it, so the guest can rebuild its version table from the disk (rescan)
// and say what it found when a block does not match.
import { promises as fsp } from 'node:fs';
import { GUEST_BLOCK_BYTES, fillBlockWords, mixIndex } from '../sim/content';

export { GUEST_BLOCK_BYTES };
const WORDS = GUEST_BLOCK_BYTES / 4;
export const BLOCK_MAGIC = 0x59524546; // "FERY" in little-endian bytes
const SEED_SALT = 0x46455259;
/** Seeds are whole numbers below 2^53 (the C side takes the same range). */
export const MAX_GUEST_SEED = Number.MAX_SAFE_INTEGER;

export interface BlockHeader {
  magic: number;
  version: number;
  block: number;
  seedKey: number;
}

/** The 32-bit key every block of a VM carries (header word 4): mixes the seed. */
export function seedKey(seed: number): number {
  if (!Number.isInteger(seed) || seed < 0 || seed > MAX_GUEST_SEED) throw new RangeError(`seed ${seed}: use a whole number from 0 to ${MAX_GUEST_SEED}`);
  return mixIndex(SEED_SALT, seed);
}

function fillBlock(out: Uint32Array, key: number, block: number, version: number): void {
  fillBlockWords(out, key, block, version);
  if (version === 0) return;
  out[0] = BLOCK_MAGIC;
  out[1] = version;
  out[2] = block >>> 0;
  out[3] = Math.floor(block / 0x1_0000_0000) >>> 0;
  out[4] = key;
}

/** The 4096 bytes of (seed, block, version). */
export function blockContent(seed: number, block: number, version: number): Buffer {
  if (!Number.isInteger(version) || version < 0 || version > 0xffff_ffff) throw new RangeError(`version ${version}: use a whole number from 0 to 2^32-1`);
  const words = new Uint32Array(WORDS);
  fillBlock(words, seedKey(seed), block, version);
  return Buffer.from(words.buffer);
}

/** The header of a block as read from a disk (version 0 and no magic when the block is all zeros). */
export function readBlockHeader(data: Buffer): BlockHeader {
  return {
    magic: data.readUInt32LE(0),
    version: data.readUInt32LE(4),
    block: data.readUInt32LE(8) + data.readUInt32LE(12) * 0x1_0000_0000,
    seedKey: data.readUInt32LE(16),
  };
}

const FILL_CHUNK_BLOCKS = 1024; // 4 MiB per write

/**
 * Writes version 1 of every block of a `diskBytes` image at `path` (created or truncated to that
 * size): the disk a guest booted with `ferry.fill=1` expects.
 */
export async function fillImage(path: string, seed: number, diskBytes: number): Promise<void> {
  if (!Number.isInteger(diskBytes) || diskBytes <= 0 || diskBytes % GUEST_BLOCK_BYTES !== 0) {
    throw new RangeError(`diskBytes ${diskBytes}: use a positive multiple of ${GUEST_BLOCK_BYTES} (the guest's block)`);
  }
  const key = seedKey(seed);
  const blocks = diskBytes / GUEST_BLOCK_BYTES;
  const words = new Uint32Array(FILL_CHUNK_BLOCKS * WORDS);
  const bytes = Buffer.from(words.buffer);
  const file = await fsp.open(path, 'w');
  try {
    await file.truncate(diskBytes);
    for (let first = 0; first < blocks; first += FILL_CHUNK_BLOCKS) {
      const count = Math.min(FILL_CHUNK_BLOCKS, blocks - first);
      for (let k = 0; k < count; k++) fillBlock(words.subarray(k * WORDS, (k + 1) * WORDS), key, first + k, 1);
      const length = count * GUEST_BLOCK_BYTES;
      const offset = first * GUEST_BLOCK_BYTES;
      for (let done = 0; done < length; ) done += (await file.write(bytes, done, length - done, offset + done)).bytesWritten;
    }
  } finally {
    await file.close();
  }
}
