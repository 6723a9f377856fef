// The destination's disk during postcopy, as the guest sees it: the local image, except that stale
// blocks (their data is still on the source) hold every I/O that touches them until they arrive.
// A read of a stale block waits for its delivery; a write covering a whole stale block makes it
// fresh (its delivery is then discarded); a partial write waits for the delivery, then applies over
// it. Per-block ordering makes a delivery and a guest write of the same block never interleave, so a
// late push never overwrites a newer guest write (DESIGN invariant 3).
import type { DiskAccess, StaleWaitStats } from '../driver';
import { BlockSet } from '../bitmap';

export interface StaleDiskEvents {
  /** The guest waits for `block`: ask the source for it ahead of the push (once per block). */
  needed(block: number): void;
}

export class StaleDisk {
  private readonly stale: BlockSet;
  /** Guest I/O waiting per block, woken by the block's delivery. */
  private readonly waiters = new Map<number, (() => void)[]>();
  private readonly requested = new Set<number>();
  /** Per-block chain of writes (deliveries and guest writes), so two writes of one block never overlap. */
  private readonly busy = new Map<number, Promise<void>>();
  private readonly stats: StaleWaitStats = { waits: 0, longestWaitMs: 0, totalWaitMs: 0 };

  constructor(
    private readonly image: DiskAccess,
    readonly blockBytes: number,
    staleBits: Buffer,
    private readonly events: StaleDiskEvents,
  ) {
    this.stale = new BlockSet(image.sizeBytes, blockBytes, staleBits);
  }

  get size(): number {
    return this.image.sizeBytes;
  }

  staleBlocks(): number[] {
    return this.stale.list();
  }

  /** Blocks asked for and not delivered yet. */
  waiting(): number[] {
    return [...this.requested];
  }

  waitStats(): StaleWaitStats {
    return { ...this.stats, longestWaitMs: round(this.stats.longestWaitMs), totalWaitMs: round(this.stats.totalWaitMs) };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    await this.whenFresh(this.blocksOf(offset, length));
    return this.image.read(offset, length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const blocks = this.blocksOf(offset, data.length);
    const partial = blocks.filter((b) => this.stale.has(b) && !this.covers(offset, data.length, b));
    await this.whenFresh(partial);
    await this.serialized(blocks, async () => {
      // Whole-block writes make their blocks fresh before the data lands: a delivery arriving now is discarded.
      for (const b of blocks) if (this.stale.has(b)) this.markFresh(b);
      await this.image.write(offset, data);
    });
  }

  flush(): Promise<void> {
    return this.image.flush();
  }

  /** A block from the source: applied only if it is still stale. Returns whether it was. */
  async deliver(block: number, data: Buffer): Promise<boolean> {
    if (!this.stale.has(block)) return false;
    let applied = false;
    await this.serialized([block], async () => {
      if (!this.stale.has(block)) return; // a guest write made it fresh while this one waited
      await this.image.write(block * this.blockBytes, data);
      this.markFresh(block);
      applied = true;
    });
    return applied;
  }

  private markFresh(block: number): void {
    this.stale.delete(block);
    this.requested.delete(block);
    for (const wake of this.waiters.get(block) ?? []) wake();
    this.waiters.delete(block);
  }

  /** Waits until none of `blocks` is stale, asking the source for each one once. */
  private async whenFresh(blocks: number[]): Promise<void> {
    const pending = blocks.filter((b) => this.stale.has(b));
    if (pending.length === 0) return;
    const started = performance.now();
    this.stats.waits++;
    await Promise.all(
      pending.map(
        (b) =>
          new Promise<void>((resolve) => {
            if (!this.stale.has(b)) return resolve();
            const list = this.waiters.get(b) ?? [];
            list.push(resolve);
            this.waiters.set(b, list);
            if (!this.requested.has(b)) {
              this.requested.add(b);
              this.events.needed(b);
            }
          }),
      ),
    );
    const waited = performance.now() - started;
    this.stats.totalWaitMs += waited;
    this.stats.longestWaitMs = Math.max(this.stats.longestWaitMs, waited);
  }

  private async serialized(blocks: number[], fn: () => Promise<void>): Promise<void> {
    const before = Promise.all(blocks.map((b) => this.busy.get(b) ?? Promise.resolve()));
    const run = before.then(fn);
    const settled = run.catch(() => undefined);
    for (const b of blocks) this.busy.set(b, settled);
    try {
      await run;
    } finally {
      for (const b of blocks) if (this.busy.get(b) === settled) this.busy.delete(b);
    }
  }

  private blocksOf(offset: number, length: number): number[] {
    if (length === 0) return [];
    const first = Math.floor(offset / this.blockBytes);
    const last = Math.floor((offset + length - 1) / this.blockBytes);
    const out: number[] = [];
    for (let b = first; b <= last; b++) out.push(b);
    return out;
  }

  private covers(offset: number, length: number, block: number): boolean {
    const from = block * this.blockBytes;
    const to = Math.min(this.image.sizeBytes, from + this.blockBytes);
    return offset <= from && offset + length >= to;
  }
}

const round = (ms: number): number => Math.round(ms * 10) / 10;
