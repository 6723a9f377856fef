// Dirty block-bitmaps with successor semantics (Luo et al. 2008, block-bitmap; QEMU's successor bitmaps).
//
// A bitmap has a `current` set (bits set by writes since the last snapshot) and a `pending` set (bits
// handed out by a snapshot and not yet acknowledged). A snapshot returns pending ∪ current, makes that
// the new pending set and restarts current empty; only an ack of the latest generation drops pending.
// So a snapshot that is lost (crash, dropped connection) is simply taken again: nothing can be lost.
import { MAX_BLOCK_BYTES, MIN_BLOCK_BYTES } from '../common/types';

const POPCOUNT = new Uint8Array(256);
for (let i = 1; i < 256; i++) POPCOUNT[i] = (i & 1) + POPCOUNT[i >> 1];

export function popcount(bits: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < bits.length; i++) n += POPCOUNT[bits[i]];
  return n;
}

export const bitmapBytes = (blocks: number): number => Math.ceil(blocks / 8);
export const blockCount = (sizeBytes: number, blockBytes: number): number => Math.ceil(sizeBytes / blockBytes);

export function isValidBlockBytes(blockBytes: unknown): blockBytes is number {
  return (
    typeof blockBytes === 'number' &&
    Number.isInteger(blockBytes) &&
    blockBytes >= MIN_BLOCK_BYTES &&
    blockBytes <= MAX_BLOCK_BYTES &&
    (blockBytes & (blockBytes - 1)) === 0
  );
}

export function testBit(bits: Uint8Array, i: number): boolean {
  return (bits[i >>> 3] & (1 << (i & 7))) !== 0;
}

/** Indices of the set bits, ascending. */
export function setBits(bits: Uint8Array, limit = Infinity): number[] {
  const out: number[] = [];
  for (let byte = 0; byte < bits.length && out.length < limit; byte++) {
    const v = bits[byte];
    if (v === 0) continue;
    for (let b = 0; b < 8; b++) if (v & (1 << b)) out.push(byte * 8 + b);
  }
  return out.length > limit ? out.slice(0, limit) : out;
}

/** A plain set of blocks of `blockBytes` over a device of `sizeBytes` (the last block may be partial). */
export class BlockSet {
  readonly blocks: number;
  readonly bits: Uint8Array;
  private count = 0;

  constructor(
    readonly sizeBytes: number,
    readonly blockBytes: number,
    bits?: Uint8Array,
  ) {
    this.blocks = blockCount(sizeBytes, blockBytes);
    this.bits = new Uint8Array(bitmapBytes(this.blocks));
    if (bits) this.unionWith(bits);
  }

  get size(): number {
    return this.count;
  }

  has(block: number): boolean {
    return block >= 0 && block < this.blocks && testBit(this.bits, block);
  }

  add(block: number): void {
    const byte = block >>> 3;
    const mask = 1 << (block & 7);
    if ((this.bits[byte] & mask) === 0) {
      this.bits[byte] |= mask;
      this.count++;
    }
  }

  delete(block: number): boolean {
    const byte = block >>> 3;
    const mask = 1 << (block & 7);
    if ((this.bits[byte] & mask) === 0) return false;
    this.bits[byte] &= ~mask;
    this.count--;
    return true;
  }

  /** Mark every block that the byte range [offset, offset+length) touches. */
  addRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.blockBytes);
    const last = Math.min(this.blocks - 1, Math.floor((offset + length - 1) / this.blockBytes));
    for (let b = first; b <= last; b++) this.add(b);
  }

  addAll(): void {
    this.bits.fill(0xff);
    const tail = this.blocks & 7;
    if (tail) this.bits[this.bits.length - 1] = (1 << tail) - 1;
    this.count = this.blocks;
  }

  clear(): void {
    this.bits.fill(0);
    this.count = 0;
  }

  unionWith(other: Uint8Array): void {
    if (other.length !== this.bits.length) {
      throw new RangeError(`bitmap has ${other.length} bytes, expected ${this.bits.length} for ${this.blocks} blocks`);
    }
    for (let i = 0; i < this.bits.length; i++) this.bits[i] |= other[i];
    const tail = this.blocks & 7;
    if (tail) this.bits[this.bits.length - 1] &= (1 << tail) - 1; // bits past the last block mean nothing
    this.count = popcount(this.bits);
  }

  /** Byte length of block `b` (the last one may be short). */
  blockLength(b: number): number {
    return Math.min(this.blockBytes, this.sizeBytes - b * this.blockBytes);
  }

  list(limit?: number): number[] {
    return setBits(this.bits, limit);
  }
}

export interface DirtySnapshot {
  generation: number;
  blockBytes: number;
  bits: Buffer;
  count: number;
}

export class DirtyBitmap {
  private current: BlockSet;
  private pending: BlockSet;
  private generation = 0;

  constructor(
    readonly sizeBytes: number,
    readonly blockBytes: number,
  ) {
    if (!isValidBlockBytes(blockBytes)) {
      throw new RangeError(
        `block size ${blockBytes} is invalid: use a power of two from ${MIN_BLOCK_BYTES} to ${MAX_BLOCK_BYTES} bytes`,
      );
    }
    this.current = new BlockSet(sizeBytes, blockBytes);
    this.pending = new BlockSet(sizeBytes, blockBytes);
  }

  get blocks(): number {
    return this.current.blocks;
  }

  /** Bits set since the last snapshot. */
  get dirtyCount(): number {
    return this.current.size;
  }

  /** Bits handed out by the latest snapshot and not yet acknowledged. */
  get pendingCount(): number {
    return this.pending.size;
  }

  get latestGeneration(): number {
    return this.generation;
  }

  /** Call before the write of [offset, offset+length) is issued. */
  markWrite(offset: number, length: number): void {
    this.current.addRange(offset, length);
  }

  markBlock(block: number): void {
    this.current.add(block);
  }

  markAll(): void {
    this.current.addAll();
  }

  snapshot(): DirtySnapshot {
    this.pending.unionWith(this.current.bits);
    this.current.clear();
    this.generation++;
    return {
      generation: this.generation,
      blockBytes: this.blockBytes,
      bits: Buffer.from(this.pending.bits),
      count: this.pending.size,
    };
  }

  /** Drops the pending set if `generation` is the latest snapshot; an older (superseded) ack does nothing. */
  ack(generation: number): boolean {
    if (generation !== this.generation || generation === 0) return false;
    this.pending.clear();
    return true;
  }

  /** pending ∪ current, without taking a snapshot (what a clean stop persists). */
  allBits(): Buffer {
    const out = Buffer.from(this.pending.bits);
    for (let i = 0; i < out.length; i++) out[i] |= this.current.bits[i];
    return out;
  }

  /** Restore persisted bits into current (after a clean stop). */
  load(bits: Uint8Array): void {
    this.current = new BlockSet(this.sizeBytes, this.blockBytes, bits);
  }
}
