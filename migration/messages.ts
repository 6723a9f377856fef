// Application messages of a migration on the data plane (the frame layer is dataplane/PROTOCOL.md).
// The source host is always the client; the destination host serves. See migration/PROTOCOL.md.

export const Msg = {
  /** meta { b: block index }, data: block b and the blocks after it (the last block of a disk may be short). */
  Block: 1,
  /** meta { runs: [[first page, count], ...] }, data: the pages of every run, in order. */
  Pages: 2,
  /** Request. meta { stateBytes, staleCount, blockBytes }, data: CPU state ++ stale bitmap. Reply: { state, epoch }. */
  Final: 3,
  /** Request. Reply: { state: OwnershipState | null, epoch, staleBlocks, resumed }. */
  Query: 4,
  /** Request: fence the epoch on the destination. Reply: { state }. */
  Abort: 5,
  /** Request (postcopy): reply meta { count, needed: number[] }, data: bitmap of blocks still stale. */
  StaleList: 6,
  /** Push from the destination (postcopy): meta { blocks: number[] } the guest is waiting for. */
  Fetch: 7,
  /** Request: flush the destination disk to stable storage. */
  Sync: 8,
  /** Request, right before the freeze: record prepared(e) if still incoming(e). Reply as Query. */
  Prepare: 9,
} as const;

export interface QueryReply {
  state: 'incoming' | 'prepared' | 'running' | 'aborted' | 'released' | null;
  epoch: number | null;
  staleBlocks: number;
}

export function bitmapIndices(bits: Buffer, limit: number): number[] {
  const out: number[] = [];
  for (let byte = 0; byte < bits.length; byte++) {
    const v = bits[byte];
    if (v === 0) continue;
    for (let bit = 0; bit < 8; bit++) {
      if (v & (1 << bit)) {
        const i = byte * 8 + bit;
        if (i < limit) out.push(i);
      }
    }
  }
  return out;
}

export function indicesToBitmap(indices: Iterable<number>, blocks: number): Buffer {
  const bits = Buffer.alloc(Math.ceil(blocks / 8));
  for (const i of indices) bits[i >> 3] |= 1 << (i & 7);
  return bits;
}
