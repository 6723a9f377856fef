import { BlockSet, DirtyBitmap, popcount, setBits } from '../../hypervisor/bitmap';

const KiB = 1024;

describe('DirtyBitmap', () => {
  it('sets one bit per block touched by a write, before anything else happens', () => {
    const bm = new DirtyBitmap(1024 * KiB, 64 * KiB); // 16 blocks
    bm.markWrite(0, 4 * KiB);
    bm.markWrite(64 * KiB - 1, 2); // straddles blocks 0 and 1
    bm.markWrite(5 * 64 * KiB, 3 * 64 * KiB); // blocks 5, 6, 7 exactly
    expect(bm.dirtyCount).toBe(5);
    const snap = bm.snapshot();
    expect(setBits(snap.bits)).toEqual([0, 1, 5, 6, 7]);
    expect(snap.count).toBe(5);
    expect(snap.blockBytes).toBe(64 * KiB);
  });

  it('snapshot moves current into pending; ack of the latest generation clears pending', () => {
    const bm = new DirtyBitmap(16 * 64 * KiB, 64 * KiB);
    bm.markBlock(3);
    const s1 = bm.snapshot();
    expect(s1.generation).toBe(1);
    expect(bm.dirtyCount).toBe(0);
    expect(bm.pendingCount).toBe(1);
    expect(bm.ack(1)).toBe(true);
    expect(bm.pendingCount).toBe(0);
    const s2 = bm.snapshot();
    expect(s2.count).toBe(0);
    expect(s2.generation).toBe(2);
  });

  it('snapshot, no ack, more writes, snapshot again contains both', () => {
    const bm = new DirtyBitmap(16 * 64 * KiB, 64 * KiB);
    bm.markBlock(2);
    const s1 = bm.snapshot(); // lost: the receiver crashed before acknowledging
    bm.markBlock(9);
    const s2 = bm.snapshot();
    expect(setBits(s1.bits)).toEqual([2]);
    expect(setBits(s2.bits)).toEqual([2, 9]);
    // A late ack of the superseded snapshot must not drop block 9 (or 2).
    expect(bm.ack(s1.generation)).toBe(false);
    expect(bm.pendingCount).toBe(2);
    bm.markBlock(11);
    expect(bm.ack(s2.generation)).toBe(true);
    expect(setBits(bm.snapshot().bits)).toEqual([11]);
  });

  it('allBits is pending ∪ current (what a clean stop persists)', () => {
    const bm = new DirtyBitmap(16 * 64 * KiB, 64 * KiB);
    bm.markBlock(1);
    bm.snapshot();
    bm.markBlock(4);
    expect(setBits(bm.allBits())).toEqual([1, 4]);
    const restored = new DirtyBitmap(16 * 64 * KiB, 64 * KiB);
    restored.load(bm.allBits());
    expect(setBits(restored.snapshot().bits)).toEqual([1, 4]);
  });

  it('handles a partial last block', () => {
    const size = 3 * 64 * KiB + 512; // 4 blocks, the last one 512 bytes
    const bm = new DirtyBitmap(size, 64 * KiB);
    expect(bm.blocks).toBe(4);
    bm.markWrite(size - 1, 1);
    bm.markWrite(size - 512, 512);
    const snap = bm.snapshot();
    expect(snap.bits.length).toBe(1);
    expect(setBits(snap.bits)).toEqual([3]);
    bm.markAll();
    expect(bm.snapshot().count).toBe(4);
  });

  it('masks bits past the last block and rejects wrong sizes', () => {
    const set = new BlockSet(10 * 4 * KiB, 4 * KiB, Uint8Array.from([0xff, 0xff]));
    expect(set.size).toBe(10);
    expect(popcount(set.bits)).toBe(10);
    expect(set.blockLength(9)).toBe(4 * KiB);
    expect(() => new BlockSet(10 * 4 * KiB, 4 * KiB, new Uint8Array(3))).toThrow(/expected 2/);
    const merged = new BlockSet(10 * 4 * KiB, 4 * KiB, Uint8Array.from([0x01, 0x00]));
    merged.unionWith(Uint8Array.from([0x00, 0xff])); // a second stale bitmap (set-stale again): still only 10 blocks
    expect(merged.size).toBe(3);
    expect(merged.list()).toEqual([0, 8, 9]);
    const odd = new BlockSet(10 * 4 * KiB + 512, 4 * KiB);
    expect(odd.blocks).toBe(11);
    expect(odd.blockLength(10)).toBe(512);
  });

  it('accepts block sizes from 4 KiB to 1 MiB, powers of two only', () => {
    expect(() => new DirtyBitmap(1 << 20, 2048)).toThrow(/power of two/);
    expect(() => new DirtyBitmap(1 << 20, 3 * 4096)).toThrow(/power of two/);
    expect(() => new DirtyBitmap(1 << 20, 2 << 20)).toThrow(/power of two/);
    expect(new DirtyBitmap(1 << 20, 4096).blocks).toBe(256);
    expect(new DirtyBitmap(1 << 20, 1 << 20).blocks).toBe(1);
  });
});
