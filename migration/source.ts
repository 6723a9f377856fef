// The source role: precopy of disk and memory, the freeze-and-copy handoff, and the postcopy push.
// Every step is idempotent for (migration, epoch): a retried activity calls the same function again
// with the cursor of its last heartbeat.
import type { BitmapSnapshot, DiskAccess, HypervisorDriver, PageRun, VmHandle } from '../hypervisor/driver';
import type { DataPlaneObserver, DataPlaneSession, TlsOptions } from '../dataplane/api';
import { connect } from '../dataplane';
import { PAGE_BYTES, vmId as asVmId } from '../common/types';
import type { Logger } from '../common/log';
import { OwnershipStore } from './ownership';
import { BaseStore, IM_BITMAP, ImStore, fingerprintFile } from './bases';
import { promises as fs } from 'node:fs';
import { createHash } from 'node:crypto';
import { Msg, bitmapIndices, type QueryReply } from './messages';
import { faultPoint } from '../common/fault-points';
import { setTimeout as sleep } from 'node:timers/promises';

export interface MigrationRef {
  migrationId: string;
  vmId: string;
  /** The epoch the destination will run; the source runs epoch - 1. */
  epoch: number;
  destinationAddress: string;
  blockBytes: number;
  bandwidthBytesPerSecond?: number | null;
  /** How long a precopy transfer keeps retrying an unreachable destination before the migration rolls back (s). */
  destinationDeadlineSeconds?: number;
}

export interface Progress {
  cursor: number;
  bytes: number;
  items: number;
}

export interface TransferResult {
  items: number;
  bytes: number;
  zeroItems: number;
  durationMs: number;
}

export type SwitchoverResult =
  | { outcome: 'committed'; staleBlocks: number; memoryBytes: number; diskBytes: number; freezeMs: number }
  | { outcome: 'aborted'; reason: string };

export class DestinationUnreachable extends Error {}

interface Pusher {
  progress: Progress;
  done: Promise<TransferResult & { fetched: number }>;
}

// Large messages: the destination applies them one after the other, and on a busy host every
// apply waits for the scheduler as much as for the disk, so fewer and larger is faster.
const PAGES_PER_MESSAGE = 1024; // 4 MiB
/** Contiguous blocks travel in one read and one message of up to this size. */
const RUN_BYTES = 4 << 20;
/** Unacknowledged bytes in flight per session: several large messages. */
const WINDOW_BYTES = 16 << 20;
/** Postcopy: what a fetched block can still find written ahead of it (the rest of the window it overtakes). */
const POSTCOPY_WRITE_AHEAD = 2 << 20;
// Bitmap names are short (QEMU's are node-local too); the migration id is hashed into one.
const trackingName = (migrationId: string): string => `mig-${createHash('sha256').update(migrationId).digest('hex').slice(0, 20)}`;

export class Source {
  /** Live sessions per migration, so a bandwidth change reaches a transfer that is running. */
  private readonly sessions = new Map<string, Set<DataPlaneSession>>();
  private readonly bandwidth = new Map<string, number | null>();
  private readonly pushers = new Map<string, Pusher>();
  private readonly bases: BaseStore;
  private readonly ims: ImStore;

  constructor(
    private readonly deps: {
      driver: HypervisorDriver;
      ownership: OwnershipStore;
      secret: Buffer;
      tls?: TlsOptions;
      log: Logger;
      home: string;
      observer?: DataPlaneObserver;
    },
  ) {
    this.bases = new BaseStore(deps.home);
    this.ims = new ImStore(deps.home);
  }

  /** Idempotent: a retried first pass starts it again. */
  private async startTracking(vm: VmHandle, ref: MigrationRef): Promise<void> {
    const name = trackingName(ref.migrationId);
    const existing = (await vm.listBitmaps()).find((b) => b.name === name);
    if (!existing) await vm.addBitmap(name, { blockBytes: ref.blockBytes, persistent: false });
    await vm.startMemoryLog();
  }

  /**
   * Starts write tracking (the migration's bitmap and the memory dirty log), then
   * the first pass over the disk, from `cursor` (a block index): every block, skipping all-zero ones,
   * onto an empty image; or, when the destination builds on its base, only the blocks written since
   * (the `im` bitmap), zero blocks included.
   */
  async copyDiskFirstPass(
    ref: MigrationRef,
    incremental: boolean,
    from: Progress,
    onProgress: (p: Progress) => void,
    signal: AbortSignal,
  ): Promise<TransferResult & { resumedFromBlock: number; skippedBlocks: number }> {
    const started = Date.now();
    const vm = await this.attach(ref.vmId);
    const disk = await vm.openDisk();
    const session = await this.session(ref, 'disk');
    try {
      await this.startTracking(vm, ref);
      const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
      // Blocks below the cursor written after a first attempt are caught by the migration's own bitmap.
      const list = incremental
        ? bitmapIndices((await vm.snapshotBitmap(IM_BITMAP)).bits, blocks).filter((b) => b >= from.cursor)
        : range(from.cursor, blocks);
      if (from.cursor > 0) this.deps.log.info({ migrationId: ref.migrationId, block: from.cursor }, 'disk precopy resumes from the last heartbeat');
      const r = await this.sendBlocks(session, disk, ref.blockBytes, list, from, onProgress, signal, { skipZero: !incremental });
      // The bulk of the image is on the destination: make it durable there outside the frozen window.
      await session.send({ type: Msg.Sync, meta: {}, data: Buffer.alloc(0) });
      await session.flush();
      const skippedBlocks = incremental ? blocks - list.length : 0;
      return { ...r, durationMs: Date.now() - started, resumedFromBlock: from.cursor, skippedBlocks };
    } finally {
      await this.release(ref, session);
      await disk.close();
      vm.close();
    }
  }

  /** What a destination needs to decide whether this VM can move incrementally. */
  async incrementalState(vmId: string): Promise<{ lineage: string | null; bitmapValid: boolean; blockBytes: number }> {
    const record = await this.ims.get(vmId);
    if (!record) return { lineage: null, bitmapValid: false, blockBytes: 0 };
    const vm = await this.attach(vmId);
    try {
      const bitmap = (await vm.listBitmaps()).find((b) => b.name === IM_BITMAP);
      return { lineage: record.lineage, bitmapValid: bitmap?.valid === true, blockBytes: record.blockBytes };
    } finally {
      vm.close();
    }
  }

  /** One dirty-bitmap round: snapshot (successor semantics), send, acknowledge. */
  async copyDiskDirty(ref: MigrationRef, signal: AbortSignal, onProgress: (p: Progress) => void): Promise<TransferResult> {
    const started = Date.now();
    const vm = await this.attach(ref.vmId);
    const disk = await vm.openDisk();
    const session = await this.session(ref, 'disk');
    try {
      const snap = await vm.snapshotBitmap(trackingName(ref.migrationId));
      const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
      const list = bitmapIndices(snap.bits, blocks);
      const r = await this.sendBlocks(session, disk, ref.blockBytes, list, { cursor: 0, bytes: 0, items: 0 }, onProgress, signal, { skipZero: false });
      await session.flush();
      await vm.ackBitmap(trackingName(ref.migrationId), snap.generation);
      return { ...r, durationMs: Date.now() - started };
    } finally {
      await this.release(ref, session);
      await disk.close();
      vm.close();
    }
  }

  /** Memory: a full pass (`full`) or one round of the pages dirtied since the last snapshot. */
  async copyMemory(ref: MigrationRef, full: boolean, from: Progress, onProgress: (p: Progress) => void, signal: AbortSignal): Promise<TransferResult> {
    const started = Date.now();
    const vm = await this.attach(ref.vmId);
    const session = await this.session(ref, 'memory');
    try {
      const status = await vm.status();
      const pages = status.memoryBytes / PAGE_BYTES;
      if (full) {
        // Pages dirtied before the full pass go with it: acknowledge them once it is through. A resumed
        // pass leaves the log alone (pages below the cursor went earlier; their writes since stay logged).
        const before = from.cursor === 0 ? await vm.snapshotMemoryLog() : null;
        const r = await this.sendPages(vm, session, contiguousRuns(range(from.cursor, pages), PAGES_PER_MESSAGE), from, onProgress, signal);
        if (before) await vm.ackMemoryLog(before.generation);
        return { ...r, durationMs: Date.now() - started };
      }
      const snap = await vm.snapshotMemoryLog();
      const r = await this.sendPages(vm, session, contiguousRuns(bitmapIndices(snap.bits, pages), PAGES_PER_MESSAGE), { cursor: 0, bytes: 0, items: 0 }, () => undefined, signal);
      await vm.ackMemoryLog(snap.generation);
      return { ...r, durationMs: Date.now() - started };
    } finally {
      await this.release(ref, session);
      vm.close();
    }
  }

  async setThrottle(vmId: string, fraction: number): Promise<void> {
    const vm = await this.attach(vmId);
    try {
      await vm.setThrottle(fraction);
    } finally {
      vm.close();
    }
  }

  /**
   * Freeze-and-copy. Pause, send the last dirty pages, the CPU state and the bitmap of still-stale
   * blocks (or, in precopy mode, the blocks themselves), and let the destination commit and resume.
   * A retry finds out what happened from the destination and never guesses.
   */
  async switchover(ref: MigrationRef, mode: 'tpm' | 'precopy'): Promise<SwitchoverResult> {
    const sourceEpoch = ref.epoch - 1;
    const own = await this.deps.ownership.get(ref.vmId);
    if (own?.state === 'released' && own.epoch === sourceEpoch) {
      return { outcome: 'committed', staleBlocks: 0, memoryBytes: 0, diskBytes: 0, freezeMs: 0 };
    }
    const vm = await this.attach(ref.vmId);
    const session = await this.session(ref, 'switchover');
    try {
      // The destination records prepared(e) before the pause, so the freeze carries one fsync there, not two.
      const before = await this.requestState(session, Msg.Prepare);
      if (before.state === 'running' && before.epoch === ref.epoch) return await this.committed(ref, 0, 0, 0, 0);
      if (before.state === 'aborted' && before.epoch === ref.epoch) {
        await vm.resume();
        return { outcome: 'aborted', reason: 'the destination had fenced this epoch' };
      }
      await faultPoint('switchover-before-pause');
      const status = await vm.status();
      const frozenAt = Date.now();
      // Paused by this attempt: no earlier attempt can have sent the Final message.
      const pausedHere = status.state === 'running';
      if (pausedHere) await vm.pause();
      await faultPoint('switchover-after-pause');
      let finalSent = false;
      let memoryBytes = 0;
      let diskBytes = 0;
      let stale: BitmapSnapshot;
      const marks: Record<string, number> = {};
      try {
        const snapMem = await vm.snapshotMemoryLog();
        const dirtyPages = contiguousRuns(bitmapIndices(snapMem.bits, status.memoryBytes / PAGE_BYTES), PAGES_PER_MESSAGE);
        memoryBytes = (await this.sendPages(vm, session, dirtyPages, { cursor: 0, bytes: 0, items: 0 }, () => undefined, new AbortController().signal)).bytes;
        marks.pagesMs = Date.now() - frozenAt;
        // Both in one round trip: the VM answers pipelined commands in order.
        const [state, staleSnap] = await Promise.all([vm.saveState(), vm.snapshotBitmap(trackingName(ref.migrationId))]);
        stale = staleSnap;
        if (mode === 'precopy') {
          const disk = await vm.openDisk();
          try {
            const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
            const r = await this.sendBlocks(session, disk, ref.blockBytes, bitmapIndices(stale.bits, blocks), { cursor: 0, bytes: 0, items: 0 }, () => undefined, new AbortController().signal, { skipZero: false });
            diskBytes = r.bytes;
          } finally {
            await disk.close();
          }
          stale = { ...stale, bits: Buffer.alloc(stale.bits.length), count: 0 };
        }
        finalSent = true;
        const final = await session.request({
          type: Msg.Final,
          meta: { stateBytes: state.length, staleCount: stale.count, blockBytes: ref.blockBytes },
          data: Buffer.concat([state, stale.bits]),
        });
        if (final.meta.state !== 'running') throw new Error(`destination answered ${String(final.meta.state)} to the final handoff`);
        marks.finalMs = Date.now() - frozenAt;
      } catch (err) {
        return await this.resolveAfterFailure(ref, vm, session, err as Error, pausedHere && !finalSent);
      }
      const result = await this.committed(ref, stale.count, memoryBytes, diskBytes, Date.now() - frozenAt, { ...marks, pages: memoryBytes / PAGE_BYTES });
      if (mode === 'tpm') this.startPostcopy(ref);
      return result;
    } finally {
      await this.release(ref, session);
      vm.close();
    }
  }

  /**
   * Postcopy: push every block the destination still marks stale, on-demand fetches first. The push
   * starts inside the switchover, right after the commit, so a guest read of a stale block never waits
   * for a Temporal round trip; the postcopy activity joins it (or starts it again after a restart).
   */
  async postcopy(ref: MigrationRef, onProgress: (p: Progress) => void): Promise<TransferResult & { fetched: number }> {
    const pusher = this.startPostcopy(ref);
    const timer = setInterval(() => onProgress(pusher.progress), 500);
    try {
      return await pusher.done;
    } finally {
      clearInterval(timer);
    }
  }

  private startPostcopy(ref: MigrationRef): Pusher {
    const running = this.pushers.get(ref.migrationId);
    if (running) return running;
    const pusher: Pusher = { progress: { cursor: 0, bytes: 0, items: 0 }, done: Promise.resolve() as never };
    pusher.done = this.push(ref, pusher).finally(() => this.pushers.delete(ref.migrationId));
    pusher.done.catch((err) => this.deps.log.warn({ migrationId: ref.migrationId, err: String(err) }, 'postcopy push stopped; the activity retries it'));
    this.pushers.set(ref.migrationId, pusher);
    return pusher;
  }

  private async push(ref: MigrationRef, pusher: Pusher): Promise<TransferResult & { fetched: number }> {
    const started = Date.now();
    const disk = await this.openBaseDisk(ref.vmId);
    const session = await this.session(ref, 'postcopy', POSTCOPY_WRITE_AHEAD);
    let items = 0;
    let bytes = 0;
    let fetched = 0;
    let pending = new Set<number>();
    const sendBlock = async (b: number, urgent: boolean): Promise<void> => {
      const data = await disk.read(b * ref.blockBytes, Math.min(ref.blockBytes, disk.sizeBytes - b * ref.blockBytes));
      await session.send({ type: Msg.Block, meta: { b }, data }, { urgent });
      items++;
      bytes += data.length;
      pusher.progress = { cursor: items, bytes, items };
    };
    // Fetched blocks go at once, ahead of the push, even one the push has queued already (the
    // destination keeps whichever copy comes first while the block is stale, and discards the other).
    let fetches = Promise.resolve();
    let fetchFailed: Error | null = null;
    const fetch = (wanted: number[]): void => {
      for (const b of wanted) {
        pending.delete(b);
        fetched++;
        fetches = fetches.then(() => sendBlock(b, true)).catch((err: Error) => void (fetchFailed ??= err));
      }
    };
    session.onPush((msg) => {
      if (msg.type === Msg.Fetch) fetch(msg.meta.blocks as number[]);
    });
    try {
      const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
      for (;;) {
        const list = await session.request({ type: Msg.StaleList, meta: {}, data: Buffer.alloc(0) });
        if (Number(list.meta.count) === 0) break;
        pending = new Set(bitmapIndices(list.data, blocks));
        fetch(list.meta.needed as number[]);
        for (const b of [...pending]) {
          if (fetchFailed) throw fetchFailed;
          if (!pending.delete(b)) continue; // fetched meanwhile
          await sendBlock(b, false);
        }
        await fetches;
        if (fetchFailed) throw fetchFailed;
        await session.flush();
      }
      return { items, bytes, zeroItems: 0, durationMs: Date.now() - started, fetched };
    } finally {
      await this.release(ref, session);
      await disk.close();
    }
  }

  /** Roll back before the commit: make sure the destination is fenced, then let the VM run here again. */
  async rollback(ref: MigrationRef | null, vmId: string, migrationId: string): Promise<{ resumed: boolean }> {
    const own = await this.deps.ownership.get(vmId);
    if (own?.state === 'released') throw new Error(`VM ${vmId} was committed to the destination; it cannot roll back`);
    const vm = await this.attach(vmId);
    try {
      const status = await vm.status();
      if (status.state === 'paused') {
        if (!ref) throw new Error(`VM ${vmId} is paused and the destination is unknown: refusing to resume without a fence`);
        const session = await this.session(ref, 'switchover');
        try {
          const answer = await session.request({ type: Msg.Abort, meta: {}, data: Buffer.alloc(0) });
          if (answer.meta.state !== 'aborted' && answer.meta.state !== null) {
            throw new Error(`destination reports ${String(answer.meta.state)} for epoch ${ref.epoch}; cannot resume the source`);
          }
        } finally {
          await this.release(ref, session);
        }
        await vm.resume();
      }
      await vm.setThrottle(0);
      const name = trackingName(migrationId);
      if ((await vm.listBitmaps()).some((b) => b.name === name)) await vm.removeBitmap(name);
      await vm.stopMemoryLog();
      return { resumed: status.state === 'paused' };
    } finally {
      vm.close();
    }
  }

  /**
   * After postcopy: the VM process here is gone for good. Its disk, as it was at the freeze, stays as
   * the base for moving the VM back incrementally (the latest base per VM is kept).
   */
  async finalize(ref: Pick<MigrationRef, 'vmId' | 'migrationId' | 'blockBytes'>): Promise<void> {
    const own = await this.deps.ownership.get(ref.vmId);
    if (own?.state !== 'released') throw new Error(`VM ${ref.vmId} is ${own?.state ?? 'unknown'} here; only a released VM is finalized`);
    const id = asVmId(ref.vmId);
    if (await this.deps.driver.exists(id)) await this.deps.driver.destroy(id, { keepDisk: true });
    await this.ims.remove(ref.vmId);
    if ((await this.bases.get(ref.vmId))?.lineage === ref.migrationId) return; // a retry
    const file = this.deps.driver.diskPath(id);
    const { size } = await fs.stat(file);
    const base = {
      vmId: ref.vmId,
      lineage: ref.migrationId,
      diskBytes: size,
      blockBytes: ref.blockBytes,
      fingerprint: await fingerprintFile(file),
      createdAt: new Date().toISOString(),
      inUseBy: null,
    };
    await this.bases.put(base);
    this.bases.digestLater(base, file).catch((err) => this.deps.log.warn({ vmId: ref.vmId, err: String(err) }, 'could not digest the base image'));
  }

  setBandwidth(migrationId: string, bytesPerSecond: number | null): void {
    this.bandwidth.set(migrationId, bytesPerSecond);
    for (const s of this.sessions.get(migrationId) ?? []) s.setBandwidth(bytesPerSecond);
  }

  private async committed(ref: MigrationRef, staleBlocks: number, memoryBytes: number, diskBytes: number, freezeMs: number, freeze: object = {}): Promise<SwitchoverResult> {
    await this.deps.ownership.release(ref.vmId, ref.epoch - 1, ref.migrationId);
    this.deps.log.info({ migrationId: ref.migrationId, vmId: ref.vmId, epoch: ref.epoch, staleBlocks, freezeMs, freeze }, 'switchover committed');
    return { outcome: 'committed', staleBlocks, memoryBytes, diskBytes, freezeMs };
  }

  /**
   * `finalNeverSent`: the destination commits only on the Final message, which carries the CPU state;
   * if this attempt paused the VM and never sent it, the destination cannot run this epoch, so the
   * source may resume even when the destination cannot be reached to fence it.
   */
  private async resolveAfterFailure(ref: MigrationRef, vm: VmHandle, session: DataPlaneSession, cause: Error, finalNeverSent: boolean): Promise<SwitchoverResult> {
    this.deps.log.warn({ migrationId: ref.migrationId, err: cause.message }, 'switchover failed; asking the destination what happened');
    let answer: QueryReply;
    try {
      answer = await this.queryDestination(session);
    } catch (err) {
      if (finalNeverSent) {
        await vm.resume();
        return { outcome: 'aborted', reason: `the destination could not be reached before the final handoff (${(err as Error).message}); the VM resumed on the source` };
      }
      throw new DestinationUnreachable(
        `VM ${ref.vmId} stays paused on the source: the destination cannot be reached to learn whether epoch ${ref.epoch} committed (${(err as Error).message})`,
      );
    }
    if (answer.state === 'running' && answer.epoch === ref.epoch) return this.committed(ref, 0, 0, 0, 0);
    const fenced = await session.request({ type: Msg.Abort, meta: {}, data: Buffer.alloc(0) });
    if (fenced.meta.state === 'running') return this.committed(ref, 0, 0, 0, 0);
    await vm.resume();
    return { outcome: 'aborted', reason: `switchover failed before the commit: ${cause.message}` };
  }

  private async queryDestination(session: DataPlaneSession): Promise<QueryReply> {
    return this.requestState(session, Msg.Query);
  }

  private async requestState(session: DataPlaneSession, type: typeof Msg.Query | typeof Msg.Prepare): Promise<QueryReply> {
    const r = await session.request({ type, meta: {}, data: Buffer.alloc(0) });
    return r.meta as unknown as QueryReply;
  }

  private async sendBlocks(
    session: DataPlaneSession,
    disk: DiskAccess,
    blockBytes: number,
    blocks: number[],
    from: Progress,
    onProgress: (p: Progress) => void,
    signal: AbortSignal,
    opts: { skipZero: boolean },
  ): Promise<Omit<TransferResult, 'durationMs'>> {
    let bytes = from.bytes;
    let items = from.items;
    let zeroItems = 0;
    // Progress is reported only up to what the destination acknowledged, so a retry resumes safely.
    const sent: Progress[] = []; // after each message: the next block, bytes and blocks so far
    const acked0 = session.stats.messagesAcked;
    const reportAcked = () => {
      const acked = session.stats.messagesAcked - acked0;
      if (acked > 0) onProgress(sent[acked - 1]);
    };
    let lastReport = Date.now();
    const runs = contiguousRuns(blocks, Math.max(1, Math.floor(RUN_BYTES / blockBytes)));
    const read = ([first, count]: Run): Promise<Buffer> => {
      const offset = first * blockBytes;
      const reading = disk.read(offset, Math.min(count * blockBytes, disk.sizeBytes - offset));
      reading.catch(() => undefined); // awaited below; a failed read-ahead must not be unhandled meanwhile
      return reading;
    };
    let next = runs.length > 0 ? read(runs[0]) : null;
    for (let i = 0; i < runs.length; i++) {
      if (signal.aborted) throw new Error('transfer cancelled');
      const data = await next!;
      next = i + 1 < runs.length ? read(runs[i + 1]) : null; // read ahead while this run is on the wire
      // One message per stretch of consecutive non-zero blocks of the run.
      const [first, count] = runs[i];
      let start = 0;
      for (let k = 0; k <= count; k++) {
        const zero = k < count && opts.skipZero && isZero(data.subarray(k * blockBytes, (k + 1) * blockBytes));
        if (k < count && !zero) continue;
        if (k > start) {
          const part = data.subarray(start * blockBytes, Math.min(k * blockBytes, data.length));
          await session.send({ type: Msg.Block, meta: { b: first + start }, data: part });
          items += k - start;
          bytes += part.length;
          sent.push({ cursor: first + k, bytes, items });
        }
        if (zero) zeroItems++;
        start = k + 1;
      }
      if (Date.now() - lastReport > 500) {
        lastReport = Date.now();
        reportAcked();
      }
    }
    // The last window drains at the link's pace (a small disk fits in it whole): keep reporting.
    const drained = session.flush().then(() => true);
    while (!(await Promise.race([drained, sleep(500).then(() => false)]))) reportAcked();
    reportAcked();
    return { items, bytes, zeroItems };
  }

  /**
   * Pages in messages of up to PAGES_PER_MESSAGE, each read from the VM in one command (scattered
   * dirty pages too), the next read while one is on the wire. Progress goes up to what was flushed.
   */
  private async sendPages(vm: VmHandle, session: DataPlaneSession, runs: Run[], from: Progress, onProgress: (p: Progress) => void, signal: AbortSignal): Promise<Omit<TransferResult, 'durationMs'>> {
    let bytes = from.bytes;
    let items = from.items;
    let lastReport = Date.now();
    const batches = messageBatches(runs, PAGES_PER_MESSAGE);
    const read = (batch: Run[]): Promise<Buffer> => {
      const reading = vm.readPageRuns(batch);
      reading.catch(() => undefined); // awaited below; a failed read-ahead must not be unhandled meanwhile
      return reading;
    };
    let next = batches.length > 0 ? read(batches[0]) : null;
    for (let i = 0; i < batches.length; i++) {
      if (signal.aborted) throw new Error('transfer cancelled');
      const data = await next!;
      next = i + 1 < batches.length ? read(batches[i + 1]) : null;
      await session.send({ type: Msg.Pages, meta: { runs: batches[i] }, data });
      bytes += data.length;
      items += data.length / PAGE_BYTES;
      if (Date.now() - lastReport > 500) {
        lastReport = Date.now();
        await session.flush();
        const [first, count] = batches[i][batches[i].length - 1];
        onProgress({ cursor: first + count, bytes, items });
      }
    }
    await session.flush();
    return { items, bytes, zeroItems: 0 };
  }

  private async openBaseDisk(vmId: string): Promise<DiskAccess> {
    const vm = await this.attach(vmId);
    try {
      return await vm.openDisk();
    } finally {
      vm.close();
    }
  }

  private async attach(vmId: string): Promise<VmHandle> {
    return this.deps.driver.attach(asVmId(vmId));
  }

  private async session(ref: MigrationRef, stream: string, writeAheadBytes?: number): Promise<DataPlaneSession> {
    const bw = this.bandwidth.has(ref.migrationId) ? this.bandwidth.get(ref.migrationId)! : ref.bandwidthBytesPerSecond ?? null;
    let session: DataPlaneSession;
    try {
      session = await connect({
        address: ref.destinationAddress,
        secret: this.deps.secret,
        tls: this.deps.tls,
        identity: { migrationId: ref.migrationId, epoch: ref.epoch, vmId: ref.vmId, stream },
        bandwidthBytesPerSecond: bw,
        windowBytes: WINDOW_BYTES,
        writeAheadBytes,
        observer: this.deps.observer,
        onReconnectError: (err) => this.deps.log.warn({ migrationId: ref.migrationId, err: err.message }, 'data plane reconnect failed'),
      });
    } catch (err) {
      throw new DestinationUnreachable(`cannot open the data plane to ${ref.destinationAddress}: ${(err as Error).message}`);
    }
    let set = this.sessions.get(ref.migrationId);
    if (!set) this.sessions.set(ref.migrationId, (set = new Set()));
    set.add(session);
    return session;
  }

  private async release(ref: MigrationRef, session: DataPlaneSession): Promise<void> {
    this.sessions.get(ref.migrationId)?.delete(session);
    await session.close().catch(() => undefined);
  }
}

const ZEROS = Buffer.alloc(1 << 20);

type Run = PageRun;

/** Sorted indices as runs of consecutive ones, each at most `max` long. */
function contiguousRuns(sorted: number[], max: number): Run[] {
  const runs: Run[] = [];
  for (const i of sorted) {
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === i && last[1] < max) last[1]++;
    else runs.push([i, 1]);
  }
  return runs;
}

/** Runs (each at most `max` long) grouped into messages of at most `max` items. */
function messageBatches(runs: Run[], max: number): Run[][] {
  const batches: Run[][] = [];
  let size = max;
  for (const run of runs) {
    if (size + run[1] > max) {
      batches.push([]);
      size = 0;
    }
    batches[batches.length - 1].push(run);
    size += run[1];
  }
  return batches;
}

function range(from: number, to: number): number[] {
  const out: number[] = [];
  for (let i = from; i < to; i++) out.push(i);
  return out;
}

function isZero(buf: Buffer): boolean {
  return buf.length <= ZEROS.length && buf.equals(ZEROS.subarray(0, buf.length));
}
