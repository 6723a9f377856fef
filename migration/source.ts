// The source role: precopy of disk and memory, the freeze-and-copy handoff, and the postcopy push.
// Every step is idempotent for (migration, epoch): a retried activity calls the same function again
// with the cursor of its last heartbeat.
import type { BitmapSnapshot, DiskAccess, HypervisorDriver, VmHandle } from '../hypervisor/driver';
import type { DataPlaneObserver, DataPlaneSession, TlsOptions } from '../dataplane/api';
import { connect } from '../dataplane';
import { PAGE_BYTES, vmId as asVmId } from '../common/types';
import type { Logger } from '../common/log';
import { OwnershipStore } from './ownership';
import { BaseStore, IM_BITMAP, ImStore, digestFile } from './bases';
import { promises as fs } from 'node:fs';
import { createHash } from 'node:crypto';
import { Msg, bitmapIndices, type QueryReply } from './messages';

export interface MigrationRef {
  migrationId: string;
  vmId: string;
  /** The epoch the destination will run; the source runs epoch - 1. */
  epoch: number;
  destinationAddress: string;
  blockBytes: number;
  bandwidthBytesPerSecond?: number | null;
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

const PAGES_PER_MESSAGE = 256; // 1 MiB
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

  async startTracking(ref: MigrationRef): Promise<void> {
    const vm = await this.attach(ref.vmId);
    try {
      const name = trackingName(ref.migrationId);
      const existing = (await vm.listBitmaps()).find((b) => b.name === name);
      if (!existing) await vm.addBitmap(name, { blockBytes: ref.blockBytes, persistent: false });
      await vm.startMemoryLog();
    } finally {
      vm.close();
    }
  }

  /**
   * The first pass over the disk, from `cursor` (a block index): every block, skipping all-zero ones,
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
        const r = await this.sendPageRange(vm, session, from.cursor, pages, from, onProgress, signal);
        await session.flush();
        return { ...r, durationMs: Date.now() - started };
      }
      const snap = await vm.snapshotMemoryLog();
      const r = await this.sendPageList(vm, session, bitmapIndices(snap.bits, pages), signal);
      await session.flush();
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
      const before = await this.queryDestination(session);
      if (before.state === 'running' && before.epoch === ref.epoch) return await this.committed(ref, 0, 0, 0, 0);
      if (before.state === 'aborted' && before.epoch === ref.epoch) {
        await vm.resume();
        return { outcome: 'aborted', reason: 'the destination had fenced this epoch' };
      }
      const frozenAt = Date.now();
      if ((await vm.status()).state === 'running') await vm.pause();
      let memoryBytes = 0;
      let diskBytes = 0;
      let stale: BitmapSnapshot;
      try {
        const status = await vm.status();
        const snapMem = await vm.snapshotMemoryLog();
        memoryBytes = (await this.sendPageList(vm, session, bitmapIndices(snapMem.bits, status.memoryBytes / PAGE_BYTES), new AbortController().signal)).bytes;
        const state = await vm.saveState();
        stale = await vm.snapshotBitmap(trackingName(ref.migrationId));
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
        const final = await session.request({
          type: Msg.Final,
          meta: { stateBytes: state.length, staleCount: stale.count, blockBytes: ref.blockBytes },
          data: Buffer.concat([state, stale.bits]),
        });
        if (final.meta.state !== 'running') throw new Error(`destination answered ${String(final.meta.state)} to the final handoff`);
      } catch (err) {
        return await this.resolveAfterFailure(ref, vm, session, err as Error);
      }
      const result = await this.committed(ref, stale.count, memoryBytes, diskBytes, Date.now() - frozenAt);
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
    const session = await this.session(ref, 'postcopy');
    const urgent: number[] = [];
    let wake: (() => void) | null = null;
    session.onPush((msg) => {
      if (msg.type !== Msg.Fetch) return;
      urgent.push(...(msg.meta.blocks as number[]));
      wake?.();
    });
    let items = 0;
    let bytes = 0;
    let fetched = 0;
    try {
      const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
      for (;;) {
        const list = await session.request({ type: Msg.StaleList, meta: {}, data: Buffer.alloc(0) });
        if (Number(list.meta.count) === 0) break;
        urgent.unshift(...(list.meta.needed as number[]));
        const pending = new Set(bitmapIndices(list.data, blocks));
        const order = [...pending];
        let next = 0;
        while (pending.size > 0) {
          let b: number | undefined;
          while (urgent.length > 0 && b === undefined) {
            const u = urgent.shift()!;
            if (pending.has(u)) {
              b = u;
              fetched++;
            }
          }
          while (b === undefined && next < order.length) {
            const c = order[next++];
            if (pending.has(c)) b = c;
          }
          if (b === undefined) break;
          pending.delete(b);
          const data = await disk.read(b * ref.blockBytes, Math.min(ref.blockBytes, disk.sizeBytes - b * ref.blockBytes));
          await session.send({ type: Msg.Block, meta: { b }, data });
          items++;
          bytes += data.length;
          pusher.progress = { cursor: items, bytes, items };
        }
        await session.flush();
      }
      return { items, bytes, zeroItems: 0, durationMs: Date.now() - started, fetched };
    } finally {
      wake = null;
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
    await this.bases.put({
      vmId: ref.vmId,
      lineage: ref.migrationId,
      diskBytes: size,
      blockBytes: ref.blockBytes,
      digest: await digestFile(file),
      createdAt: new Date().toISOString(),
      inUseBy: null,
    });
  }

  setBandwidth(migrationId: string, bytesPerSecond: number | null): void {
    this.bandwidth.set(migrationId, bytesPerSecond);
    for (const s of this.sessions.get(migrationId) ?? []) s.setBandwidth(bytesPerSecond);
  }

  private async committed(ref: MigrationRef, staleBlocks: number, memoryBytes: number, diskBytes: number, freezeMs: number): Promise<SwitchoverResult> {
    await this.deps.ownership.release(ref.vmId, ref.epoch - 1, ref.migrationId);
    this.deps.log.info({ migrationId: ref.migrationId, vmId: ref.vmId, epoch: ref.epoch, staleBlocks, freezeMs }, 'switchover committed');
    return { outcome: 'committed', staleBlocks, memoryBytes, diskBytes, freezeMs };
  }

  private async resolveAfterFailure(ref: MigrationRef, vm: VmHandle, session: DataPlaneSession, cause: Error): Promise<SwitchoverResult> {
    this.deps.log.warn({ migrationId: ref.migrationId, err: cause.message }, 'switchover failed; asking the destination what happened');
    let answer: QueryReply;
    try {
      answer = await this.queryDestination(session);
    } catch (err) {
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
    const r = await session.request({ type: Msg.Query, meta: {}, data: Buffer.alloc(0) });
    return r.meta as unknown as QueryReply;
  }

  private async sendBlocks(
    session: DataPlaneSession,
    disk: DiskAccess,
    blockBytes: number,
    blocks: Iterable<number>,
    from: Progress,
    onProgress: (p: Progress) => void,
    signal: AbortSignal,
    opts: { skipZero: boolean },
  ): Promise<Omit<TransferResult, 'durationMs'>> {
    let bytes = from.bytes;
    let items = from.items;
    let zeroItems = 0;
    // Progress is reported only up to what the destination acknowledged, so a retry resumes safely.
    const sentOrder: number[] = [];
    const acked0 = session.stats.messagesAcked;
    let lastReport = Date.now();
    for (const b of blocks) {
      if (signal.aborted) throw new Error('transfer cancelled');
      const offset = b * blockBytes;
      const data = await disk.read(offset, Math.min(blockBytes, disk.sizeBytes - offset));
      if (opts.skipZero && isZero(data)) {
        zeroItems++;
        continue;
      }
      await session.send({ type: Msg.Block, meta: { b }, data });
      sentOrder.push(b);
      items++;
      bytes += data.length;
      if (Date.now() - lastReport > 500) {
        lastReport = Date.now();
        const acked = session.stats.messagesAcked - acked0;
        if (acked > 0) onProgress({ cursor: sentOrder[acked - 1] + 1, bytes, items });
      }
    }
    await session.flush();
    return { items, bytes, zeroItems };
  }

  private async sendPageRange(vm: VmHandle, session: DataPlaneSession, first: number, pages: number, from: Progress, onProgress: (p: Progress) => void, signal: AbortSignal): Promise<Omit<TransferResult, 'durationMs'>> {
    let bytes = from.bytes;
    let items = from.items;
    let lastReport = Date.now();
    for (let p = first; p < pages; p += PAGES_PER_MESSAGE) {
      if (signal.aborted) throw new Error('transfer cancelled');
      const count = Math.min(PAGES_PER_MESSAGE, pages - p);
      const data = await vm.readPages(p, count);
      await session.send({ type: Msg.Pages, meta: { p }, data });
      bytes += data.length;
      items += count;
      if (Date.now() - lastReport > 500) {
        lastReport = Date.now();
        await session.flush();
        onProgress({ cursor: p + count, bytes, items });
      }
    }
    return { items, bytes, zeroItems: 0 };
  }

  private async sendPageList(vm: VmHandle, session: DataPlaneSession, pages: number[], signal: AbortSignal): Promise<Omit<TransferResult, 'durationMs'>> {
    let bytes = 0;
    for (let i = 0; i < pages.length; ) {
      if (signal.aborted) throw new Error('transfer cancelled');
      // Coalesce runs of consecutive pages into one message.
      let j = i + 1;
      while (j < pages.length && pages[j] === pages[j - 1] + 1 && j - i < PAGES_PER_MESSAGE) j++;
      const data = await vm.readPages(pages[i], j - i);
      await session.send({ type: Msg.Pages, meta: { p: pages[i] }, data });
      bytes += data.length;
      i = j;
    }
    await session.flush();
    return { items: pages.length, bytes, zeroItems: 0 };
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

  private async session(ref: MigrationRef, stream: string): Promise<DataPlaneSession> {
    const bw = this.bandwidth.has(ref.migrationId) ? this.bandwidth.get(ref.migrationId)! : ref.bandwidthBytesPerSecond ?? null;
    let session: DataPlaneSession;
    try {
      session = await connect({
        address: ref.destinationAddress,
        secret: this.deps.secret,
        tls: this.deps.tls,
        identity: { migrationId: ref.migrationId, epoch: ref.epoch, vmId: ref.vmId, stream },
        bandwidthBytesPerSecond: bw,
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

function range(from: number, to: number): number[] {
  const out: number[] = [];
  for (let i = from; i < to; i++) out.push(i);
  return out;
}

function isZero(buf: Buffer): boolean {
  return buf.length <= ZEROS.length && buf.equals(ZEROS.subarray(0, buf.length));
}
