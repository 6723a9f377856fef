// Application messages of a migration on the data plane (the frame layer is dataplane/PROTOCOL.md).
// The source host is always the client; the destination host serves. See migration/PROTOCOL.md.

/** Version of these messages' meaning; Prepare and StreamStart carry it, and a destination refuses another. */
export const MIGRATION_PROTOCOL = 2;

export const Msg = {
  /** meta { b: block index }, data: block b and the blocks after it (the last block of a disk may be short). */
  Block: 1,
  /** meta { stream, seq }, data: the next bytes of the hypervisor's machine-state stream. */
  State: 2,
  /** Request, with the guest paused. meta { staleCount, blockBytes, lastHeartbeatMs, guestRunning }, data: stale bitmap. Reply as Query. */
  Final: 3,
  /** Request. Reply: { state: OwnershipState | null, epoch, staleBlocks }. */
  Query: 4,
  /** Request: fence the epoch on the destination. Reply as Query. */
  Abort: 5,
  /** Request (postcopy): reply meta { count, needed: number[] }, data: bitmap of blocks still stale. */
  StaleList: 6,
  /** Push from the destination (postcopy): meta { blocks: number[] } the guest is waiting for. */
  Fetch: 7,
  /** Message (not a request): flush the destination disk to stable storage; the source waits for its acknowledgement. */
  Sync: 8,
  /** Request, at the start of the switchover step (before the stream): record prepared(e) if still incoming(e). meta { protocol, guestRunning }. Reply as Query. */
  Prepare: 9,
  /** Request: a new machine-state stream `meta.stream` begins (a fresh incoming VM takes it). meta { stream, protocol }. */
  StreamStart: 10,
  /** Request, after the whole stream was applied: load the stale set, commit, resume. Reply as Query. */
  Commit: 11,
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
