// The source role: precopy of disk and memory, the freeze-and-copy handoff, and the postcopy push.
// Every step is idempotent for (migration, epoch): a retried activity calls the same function again
// with the cursor of its last heartbeat.
import type { BitmapSnapshot, DiskAccess, HypervisorDriver, StreamProgress, VmExit, VmHandle } from '../hypervisor/driver';
import { DataPlaneError, type DataPlaneObserver, type DataPlaneSession, type TlsOptions } from '../dataplane/api';
import { connect } from '../dataplane';
import { vmId as asVmId } from '../common/types';
import type { Logger } from '../common/log';
import { OwnershipStore } from './ownership';
import { BaseStore, IM_BITMAP, ImStore, fingerprintFile } from './bases';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { writeFileDurable } from '../common/durable-file';
import { createHash } from 'node:crypto';
import { MIGRATION_PROTOCOL, Msg, bitmapIndices, type QueryReply } from './messages';
import { CarriedStream } from './machine-stream';
import { faultPoint } from '../common/fault-points';
import { DEFAULTS } from '../common/migration';
import { Cleanup } from '../common/cleanup';
import { isHypervisorError } from '../hypervisor/errors';
import { describeExit } from '../hypervisor/exit';
import { setTimeout as sleep } from 'node:timers/promises';

export interface MigrationRef {
  migrationId: string;
  vmId: string;
  /** The epoch the destination will run; the source runs epoch - 1. */
  epoch: number;
  destinationAddress: string;
  /** The destination's host name, for messages that say which host failed. */
  destinationHost?: string;
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
  | {
      outcome: 'committed';
      staleBlocks: number;
      memoryBytes: number;
      diskBytes: number;
      freezeMs: number;
      /** The data transfer inside the switchover: the memory precopy (with its disk rounds) and the freeze (ms). */
      durationMs: number;
      hypervisorDowntimeMs: number | null;
      memoryIterations: number;
      throttled: boolean;
    }
  | { outcome: 'aborted'; reason: string; memoryBytes: number; diskBytes: number };

export interface MachineStateOptions {
  /** The freeze the hypervisor aims for (ms). */
  downtimeTargetMs: number;
  /** Let the hypervisor slow the guest's CPU when memory does not converge. */
  autoConverge: boolean;
}

/** Heartbeat details of a switchover: which part runs, and what it carried so far. */
export interface SwitchoverProgress extends Progress {
  stage: 'memory-precopy' | 'switchover';
  memoryBytes: number;
  diskBytes: number;
  dirtyBlocks: number;
}

export class DestinationUnreachable extends Error {
  /** `lostSession`: an open session went silent and did not come back (the destination was unreachable for a while already). */
  constructor(
    message: string,
    readonly lostSession = false,
  ) {
    super(message);
  }
}

/** The source VM's process is not running (it died, or was stopped) while a migration needs it. */
export class VmGone extends Error {
  constructor(
    readonly vmId: string,
    readonly host: string,
    readonly exit: VmExit | null,
  ) {
    super(
      exit
        ? `VM ${vmId} died on host ${host} (${describeExit(exit)}): it is crashed, not paused, and the migration stops; restarting it is your choice (ferry vm start ${vmId} --host ${host})`
        : `VM ${vmId} has no running process on host ${host} (it was stopped): the migration stops; start it again with ferry vm start ${vmId} --host ${host}`,
    );
    this.name = 'VmGone';
  }
}

/** A stopped source VM may resume only once the destination fenced the epoch; it has not confirmed yet. */
export class FenceUnconfirmed extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FenceUnconfirmed';
  }
}

export interface RollbackResult {
  /** The guest runs again on the source. */
  resumed: boolean;
  /** The source VM's run state afterwards (`crashed` when its process died). */
  state: string;
  exit?: VmExit;
}

/** Data-plane failures of the connection itself (the destination may be restarting): everything else is an answer. */
const CONNECTION_ERRORS = new Set(['connect_failed', 'timeout', 'disconnected']);

interface Pusher {
  progress: Progress;
  done: Promise<TransferResult & { fetched: number }>;
}

// Large messages: the destination applies them one after the other, and on a busy host every
// apply waits for the scheduler as much as for the disk, so fewer and larger is faster.
/** The downtime limit of a forced switchover (the completion timeout's `switchover` action): take the freeze it takes. */
const FORCED_DOWNTIME_MS = 3_600_000;
/** Contiguous blocks travel in one read and one message of up to this size. */
const RUN_BYTES = 4 << 20;
/** Unacknowledged bytes in flight per session: several large messages. */
/** The data-plane window of every transfer: 16 MiB, enough for a 1 Gbit/s link of up to ~130 ms round trip. */
export const WINDOW_BYTES = 16 << 20;

/**
 * How soon a silent data plane counts as lost (three keepalive intervals without a byte) and how long
 * it may then take to come back, chosen from the migration's destination deadline so that a cut link
 * fails the session about when the deadline expires (not 45 s later), but never faster than a busy
 * host can answer a keepalive, and never before a link down for a few seconds is back.
 */
export function dataPlaneLiveness(deadlineSeconds: number): { keepaliveMs: number; reconnectTimeoutMs: number; lostAfterMs: number } {
  const deadlineMs = deadlineSeconds * 1000;
  const keepaliveMs = Math.round(Math.min(5_000, Math.max(2_000, deadlineMs / 6)));
  const reconnectTimeoutMs = Math.round(Math.min(30_000, Math.max(10_000, deadlineMs - 3 * keepaliveMs)));
  return { keepaliveMs, reconnectTimeoutMs, lostAfterMs: 3 * keepaliveMs + reconnectTimeoutMs };
}
/** Postcopy: what a fetched block can still find written ahead of it (the rest of the window it overtakes). */
const POSTCOPY_WRITE_AHEAD = 2 << 20;
// Bitmap names are short (QEMU's are node-local too); the migration id is hashed into one.
const trackingName = (migrationId: string): string => `mig-${createHash('sha256').update(migrationId).digest('hex').slice(0, 20)}`;

export class Source {
  /** Live sessions per migration, so a bandwidth change reaches a transfer that is running. */
  private readonly sessions = new Map<string, Set<DataPlaneSession>>();
  private readonly bandwidth = new Map<string, number | null>();
  private readonly pushers = new Map<string, Pusher>();
  private readonly streams = new Map<string, CarriedStream>();
  /** Migrations whose freeze began here: an abort can no longer stop them. */
  private readonly freezing = new Set<string>();
  private readonly bases: BaseStore;
  private readonly ims: ImStore;
  /** The steps running per VM, so that the VM process dying stops them at once. */
  private readonly running = new Map<string, Set<AbortController>>();
  /** Migrations this agent worked on that have not ended here (reconciled against their workflows). */
  private readonly active = new Map<string, string>();

  constructor(
    private readonly deps: {
      host: string;
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
    deps.driver.onCrash((vm, exit) => {
      const steps = this.running.get(vm);
      if (!steps?.size) return;
      this.deps.log.error({ vmId: vm, exit }, `source VM died during a migration (${describeExit(exit)}): stopping its migration steps`);
      for (const step of steps) step.abort(new VmGone(vm, this.deps.host, exit));
    });
  }

  /**
   * Runs a step on the VM: it ends at once (with VmGone) when the VM's process dies, and with the
   * cancellation when the workflow cancels it, even while it waits for the data plane. What it
   * acquired is released either way.
   */
  private async step<T>(vmId: string, signal: AbortSignal, fn: (signal: AbortSignal, cleanup: Cleanup) => Promise<T>): Promise<T> {
    const ac = new AbortController();
    const onCancel = () => ac.abort(signal.reason ?? new Error('the step was cancelled'));
    if (signal.aborted) onCancel();
    signal.addEventListener('abort', onCancel, { once: true });
    let steps = this.running.get(vmId);
    if (!steps) this.running.set(vmId, (steps = new Set()));
    steps.add(ac);
    const cleanup = new Cleanup();
    try {
      const work = fn(ac.signal, cleanup);
      work.catch(() => undefined); // after an abort it fails on its own, released resources and all
      return await Promise.race([work, abortedWith(ac.signal)]);
    } catch (err) {
      // What failed on a VM that died was its death (the crash watch may not have said so yet).
      if (!(err instanceof VmGone) && !signal.aborted) await this.throwIfGone(vmId);
      // A session that lost its connection for good: the destination is as unreachable as one that never answered.
      if (err instanceof DataPlaneError && CONNECTION_ERRORS.has(err.code)) throw new DestinationUnreachable(`lost the data plane to the destination: ${err.message}`, err.code === 'disconnected');
      throw err;
    } finally {
      signal.removeEventListener('abort', onCancel);
      steps.delete(ac);
      if (steps.size === 0) this.running.delete(vmId);
      await cleanup.run();
    }
  }

  /** Migrations this agent took part in as the source and that have not ended here. */
  activeMigrations(): { migrationId: string; vmId: string }[] {
    return [...this.active].map(([migrationId, vmId]) => ({ migrationId, vmId }));
  }

  /**
   * A migration whose workflow ended without telling this host (terminated from the UI, say):
   * stop its stream, its tracking and its throttle. The VM keeps its run state.
   */
  async forget(migrationId: string): Promise<void> {
    const vmId = this.active.get(migrationId);
    if (!vmId) return;
    this.active.delete(migrationId);
    await this.stopStream(migrationId);
    const vm = await this.attach(vmId).catch(() => null);
    if (!vm) return;
    try {
      await vm.setThrottle(0);
      const name = trackingName(migrationId);
      if ((await vm.listBitmaps()).some((b) => b.name === name)) await vm.removeBitmap(name);
    } finally {
      vm.close();
    }
  }

  /** Idempotent: a retried first pass starts it again. */
  private async startTracking(vm: VmHandle, ref: MigrationRef): Promise<void> {
    const name = trackingName(ref.migrationId);
    const existing = (await vm.listBitmaps()).find((b) => b.name === name);
    if (!existing) await vm.addBitmap(name, { blockBytes: ref.blockBytes, persistent: false });
  }

  /**
   * Starts write tracking (the migration's bitmap), then
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
    this.active.set(ref.migrationId, ref.vmId);
    return this.step(ref.vmId, signal, async (stepSignal, cleanup) => {
      const vm = cleanup.add(await this.attach(ref.vmId), (v) => v.close());
      const disk = cleanup.add(await vm.openDisk(), (d) => d.close());
      const session = cleanup.add(await this.session(ref, 'disk'), (s) => this.release(ref, s));
      await this.startTracking(vm, ref);
      const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
      // Blocks below the cursor written after a first attempt are caught by the migration's own bitmap.
      const list = incremental
        ? bitmapIndices((await vm.snapshotBitmap(IM_BITMAP)).bits, blocks).filter((b) => b >= from.cursor)
        : range(from.cursor, blocks);
      if (from.cursor > 0) this.deps.log.info({ migrationId: ref.migrationId, block: from.cursor }, 'disk precopy resumes from the last heartbeat');
      const r = await this.sendBlocks(session, disk, ref.blockBytes, list, from, onProgress, stepSignal, { skipZero: !incremental });
      // The bulk of the image is on the destination: make it durable there outside the frozen window.
      await session.send({ type: Msg.Sync, meta: {}, data: Buffer.alloc(0) });
      await session.flush();
      const skippedBlocks = incremental ? blocks - list.length : 0;
      return { ...r, durationMs: Date.now() - started, resumedFromBlock: from.cursor, skippedBlocks };
    });
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
    this.active.set(ref.migrationId, ref.vmId);
    return this.step(ref.vmId, signal, async (stepSignal, cleanup) => {
      const vm = cleanup.add(await this.attach(ref.vmId), (v) => v.close());
      const disk = cleanup.add(await vm.openDisk(), (d) => d.close());
      const session = cleanup.add(await this.session(ref, 'disk'), (s) => this.release(ref, s));
      const snap = await vm.snapshotBitmap(trackingName(ref.migrationId));
      const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
      const list = bitmapIndices(snap.bits, blocks);
      const r = await this.sendBlocks(session, disk, ref.blockBytes, list, { cursor: 0, bytes: 0, items: 0 }, onProgress, stepSignal, { skipZero: false });
      await session.flush();
      await vm.ackBitmap(trackingName(ref.migrationId), snap.generation);
      return { ...r, durationMs: Date.now() - started };
    });
  }

  private async ensureStream(ref: MigrationRef, limits: MachineStateOptions): Promise<CarriedStream> {
    const running = this.streams.get(ref.migrationId);
    if (running && !running.broken) return running;
    if (running) await this.stopStream(ref.migrationId);
    const cleanup = new Cleanup();
    try {
      const session = cleanup.add(await this.session(ref, 'state'), (s) => this.release(ref, s));
      const vm = await this.attach(ref.vmId);
      let carried: CarriedStream;
      try {
        carried = await CarriedStream.start(session, () =>
          vm.migrateOut({ downtimeLimitMs: limits.downtimeTargetMs, autoConverge: limits.autoConverge, bandwidthBytesPerSecond: this.bandwidthOf(ref) }),
        );
      } finally {
        vm.close();
      }
      this.streams.set(ref.migrationId, carried);
      carried.failed.catch((err: Error) => this.deps.log.warn({ migrationId: ref.migrationId, err: err.message }, 'machine-state stream stopped'));
      return carried;
    } catch (err) {
      await cleanup.run();
      throw err;
    }
  }

  /**
   * An abort during the memory precopy: recorded durably (a retried switchover after an agent restart
   * sees it too) and the stream stopped, unless the freeze has begun (then the switchover goes on to its
   * end). The switchover activity sees it and rolls back.
   */
  async cancelMachineState(migrationId: string): Promise<{ cancelled: boolean }> {
    if (this.freezing.has(migrationId)) return { cancelled: false };
    await writeFileDurable(this.abortFile(migrationId), new Date().toISOString());
    await this.stopStream(migrationId);
    return { cancelled: true };
  }

  private abortFile(migrationId: string): string {
    return path.join(this.deps.home, 'aborts', migrationId);
  }

  private async abortRequested(migrationId: string): Promise<boolean> {
    return fs.access(this.abortFile(migrationId)).then(
      () => true,
      () => false,
    );
  }

  /** The completion timeout with `onCompletionTimeout: switchover`: accept whatever freeze the hypervisor needs. */
  async forceSwitchover(migrationId: string): Promise<void> {
    await this.streams.get(migrationId)?.setLimits({ downtimeLimitMs: FORCED_DOWNTIME_MS });
  }

  /** Cancels the migration's stream, if one runs here: the hypervisor resumes the guest on its own. */
  private async stopStream(migrationId: string): Promise<void> {
    const carried = this.streams.get(migrationId);
    if (!carried) return;
    this.streams.delete(migrationId);
    await carried.cancel();
    this.sessions.get(migrationId)?.delete(carried.session);
    await carried.session.close().catch(() => undefined);
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
   * Memory precopy and freeze-and-copy, in one activity so that no Temporal round trip falls inside
   * the freeze. The hypervisor's stream copies memory while disk rounds keep the dirty set small; at
   * its switchover point the hypervisor pauses the guest, Ferry sends the bitmap of still-stale blocks
   * (or, in precopy mode, the blocks themselves), the hypervisor sends the rest of the machine state,
   * and the destination is asked to commit and resume. A retry finds out what happened from the
   * destination and never guesses.
   */
  async switchover(ref: MigrationRef, mode: 'tpm' | 'precopy', opts: MachineStateOptions, onProgress: (p: SwitchoverProgress) => void): Promise<SwitchoverResult> {
    const sourceEpoch = ref.epoch - 1;
    const own = await this.deps.ownership.get(ref.vmId);
    if (own?.state === 'released' && own.epoch === sourceEpoch) return this.committedBefore();
    this.active.set(ref.migrationId, ref.vmId);
    const sent = { memoryBytes: 0, diskBytes: 0 };
    const aborted = (reason: string): SwitchoverResult => ({ outcome: 'aborted', reason, ...sent });
    const cleanup = new Cleanup();
    try {
      const session = cleanup.add(await this.session(ref, 'switchover'), (s) => this.release(ref, s));
      const vm = cleanup.add(await this.attach(ref.vmId), (v) => v.close());
      const status = await vm.status();
      // A paused VM migrates paused (a cold migration); a halted one stays halted.
      const guestRunning = status.state !== 'paused';
      // The destination records prepared(e) before the pause, so the freeze carries one fsync there, not two.
      const before = await this.requestState(session, Msg.Prepare, { guestRunning });
      if (before.state === 'running' && before.epoch === ref.epoch) return await this.committed(ref, this.committedBefore());
      if (before.state === 'aborted' && before.epoch === ref.epoch) {
        await this.stopStream(ref.migrationId);
        if (status.state === 'migrated') await vm.resume();
        return aborted('the destination had fenced this epoch');
      }
      if (status.state === 'migrated') {
        // An earlier attempt's stream completed, but its commit never came back: only the destination knows.
        return await this.resolveAfterFailure(ref, vm, session, new Error('an earlier switchover attempt was interrupted after its stream completed'), true, sent);
      }
      if (await this.abortRequested(ref.migrationId)) return aborted('aborted by operator');
      // Before the freeze no Final has left, so nothing can commit: a destination lost past the
      // reconnect window is a rollback now, not a wait for an answer it does not owe.
      const lostBeforeFreeze = async (err: unknown): Promise<SwitchoverResult> => {
        await this.throwIfGone(ref.vmId);
        if (err instanceof DestinationUnreachable || (err instanceof DataPlaneError && CONNECTION_ERRORS.has(err.code))) {
          return this.resolveAfterFailure(ref, vm, session, err, false, sent);
        }
        throw err;
      };
      await faultPoint('switchover-before-pause');
      const transferStartedAt = Date.now();
      let carried: CarriedStream;
      try {
        carried = await this.ensureStream(ref, opts);
      } catch (err) {
        return await lostBeforeFreeze(err);
      }
      const tracking = trackingName(ref.migrationId);
      const report = (stage: SwitchoverProgress['stage'], dirtyBlocks: number): void => {
        const memoryBytes = sent.memoryBytes + carried.carriedBytes - carried.reportedBytes;
        onProgress({ cursor: 0, bytes: memoryBytes + sent.diskBytes, items: 0, stage, memoryBytes, diskBytes: sent.diskBytes, dirtyBlocks });
      };
      // Memory precopy: the hypervisor iterates on its own; disk rounds go on meanwhile, and the one
      // running when the hypervisor pauses the guest stops at once (its blocks stay pending for the freeze).
      const atReady = new AbortController();
      carried.ready().then(
        () => atReady.abort(),
        () => atReady.abort(),
      );
      let dirtyBlocks = 0;
      try {
        while (!atReady.signal.aborted) {
          if (await this.abortRequested(ref.migrationId)) await this.stopStream(ref.migrationId);
          report('memory-precopy', dirtyBlocks);
          const round = await this.diskRound(vm, session, ref, tracking, atReady.signal);
          sent.diskBytes += round.bytes;
          dirtyBlocks = round.items;
          if (round.items <= 1) await Promise.race([carried.ready().catch(() => undefined), sleep(200)]);
        }
      } catch (err) {
        return await lostBeforeFreeze(err);
      }
      if (carried.broken) {
        sent.memoryBytes += carried.takeUnreported();
        // A VM that died broke its own stream: that is a crash to report, not an abort to retry.
        await this.throwIfGone(ref.vmId);
        if (await this.abortRequested(ref.migrationId)) return aborted('aborted by operator');
        return aborted(`the machine-state stream stopped before the freeze: ${carried.broken.message}`);
      }
      this.freezing.add(ref.migrationId);
      const frozenAt = Date.now();
      report('switchover', dirtyBlocks);
      await faultPoint('switchover-after-pause');
      let commitSent = false;
      let stale: BitmapSnapshot;
      const marks: Record<string, number> = {};
      let hypervisorDowntimeMs: number | null = null;
      let progress: StreamProgress | null = null;
      try {
        stale = await vm.snapshotBitmap(tracking);
        if (mode === 'precopy') {
          const disk = await vm.openDisk();
          try {
            const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
            const r = await this.sendBlocks(session, disk, ref.blockBytes, bitmapIndices(stale.bits, blocks), { cursor: 0, bytes: 0, items: 0 }, () => undefined, new AbortController().signal, { skipZero: false });
            sent.diskBytes += r.bytes;
          } finally {
            await disk.close();
          }
          stale = { ...stale, bits: Buffer.alloc(stale.bits.length), count: 0 };
        }
        const lastHeartbeatMs = (await vm.status()).guest?.lastHeartbeatMs ?? null;
        await session.request({
          type: Msg.Final,
          meta: { staleCount: stale.count, blockBytes: ref.blockBytes, lastHeartbeatMs, guestRunning },
          data: stale.bits,
        });
        marks.finalMs = Date.now() - frozenAt;
        await carried.stream.continue();
        progress = await carried.drained();
        hypervisorDowntimeMs = progress.downtimeMs;
        marks.streamMs = Date.now() - frozenAt;
        commitSent = true;
        const commit = await session.request({ type: Msg.Commit, meta: {}, data: Buffer.alloc(0) });
        if (commit.meta.state !== 'running') throw new Error(`destination answered ${String(commit.meta.state)} to the commit`);
        marks.commitMs = Date.now() - frozenAt;
      } catch (err) {
        return await this.resolveAfterFailure(ref, vm, session, err as Error, commitSent, sent);
      }
      sent.memoryBytes += carried.takeUnreported();
      this.streams.delete(ref.migrationId);
      await this.release(ref, carried.session);
      const result = await this.committed(
        ref,
        {
          outcome: 'committed',
          staleBlocks: stale.count,
          ...sent,
          freezeMs: Date.now() - frozenAt,
          durationMs: Date.now() - transferStartedAt,
          hypervisorDowntimeMs,
          memoryIterations: progress?.iterations ?? 0,
          throttled: (progress?.throttle ?? 0) > 0,
        },
        marks,
      );
      if (mode === 'tpm') this.startPostcopy(ref);
      return result;
    } finally {
      this.freezing.delete(ref.migrationId);
      await cleanup.run();
    }
  }

  /**
   * One dirty-bitmap round on an open session: snapshot (successor semantics), send, acknowledge. When
   * `signal` fires the round stops; what it did not acknowledge stays pending for the next snapshot.
   */
  private async diskRound(vm: VmHandle, session: DataPlaneSession, ref: MigrationRef, tracking: string, signal: AbortSignal): Promise<Omit<TransferResult, 'durationMs'>> {
    const snap = await vm.snapshotBitmap(tracking);
    if (snap.count === 0) {
      await vm.ackBitmap(tracking, snap.generation);
      return { items: 0, bytes: 0, zeroItems: 0 };
    }
    const disk = await vm.openDisk();
    try {
      const blocks = Math.ceil(disk.sizeBytes / ref.blockBytes);
      const r = await this.sendBlocks(session, disk, ref.blockBytes, bitmapIndices(snap.bits, blocks), { cursor: 0, bytes: 0, items: 0 }, () => undefined, signal, { skipZero: false }).catch(
        (err: Error) => {
          if (signal.aborted) return { items: 0, bytes: 0, zeroItems: 0 };
          throw err;
        },
      );
      if (signal.aborted) return r;
      await session.flush();
      await vm.ackBitmap(tracking, snap.generation);
      return r;
    } finally {
      await disk.close();
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
    const cleanup = new Cleanup();
    // The VM's machine state left at the commit; its image as it was at the freeze is what the destination lacks.
    const disk = cleanup.add(await this.deps.driver.openImage(asVmId(ref.vmId)), (d) => d.close());
    const session = await this.session(ref, 'postcopy', POSTCOPY_WRITE_AHEAD).catch(async (err: unknown) => {
      await cleanup.run();
      throw err;
    });
    cleanup.add(session, (s) => this.release(ref, s));
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
        await faultPoint('postcopy-push');
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
      await cleanup.run();
    }
  }

  /**
   * Roll back before the commit: stop the stream (the hypervisor resumes the guest it paused), make sure
   * the destination is fenced wherever the guest does not run here, then give the VM back the run
   * state it had before the migration (`wasRunning`). A VM whose process died stays as it is
   * (crashed): restarting it is the operator's choice, and the rollback never waits for it.
   * `destinationLost`: an operator declared the destination lost (ferry resolve) and the workflow
   * recorded its fence; the source resumes without its answer.
   */
  async rollback(ref: MigrationRef | null, vmId: string, migrationId: string, wasRunning: boolean, opts: { destinationLost?: boolean } = {}): Promise<RollbackResult> {
    const own = await this.deps.ownership.get(vmId);
    if (own?.state === 'released') throw new Error(`VM ${vmId} was committed to the destination; it cannot roll back`);
    await this.stopStream(migrationId);
    await fs.rm(this.abortFile(migrationId), { force: true });
    let vm: VmHandle;
    try {
      vm = await this.attach(vmId);
    } catch (err) {
      if (!(err instanceof VmGone)) throw err;
      this.active.delete(migrationId);
      const status = await this.deps.driver.inspect(asVmId(vmId));
      return { resumed: false, state: status.state, ...(status.exit ? { exit: status.exit } : {}) };
    }
    try {
      const status = await vm.status();
      const stopped = status.state === 'migrated' || (status.state === 'paused' && wasRunning);
      if (stopped) {
        if (!opts.destinationLost) await this.confirmFence(ref, vmId, status.state);
        await vm.resume();
        if (!wasRunning) await vm.pause();
      }
      await vm.setThrottle(0);
      const name = trackingName(migrationId);
      if ((await vm.listBitmaps()).some((b) => b.name === name)) await vm.removeBitmap(name);
      this.active.delete(migrationId);
      return { resumed: stopped && wasRunning, state: (await vm.status()).state };
    } finally {
      vm.close();
    }
  }

  /** The destination durably fenced the epoch (or never heard of it): only then may a stopped source resume. */
  private async confirmFence(ref: MigrationRef | null, vmId: string, state: string): Promise<void> {
    const stays = `VM ${vmId} is ${state} on this host and stays so until the destination confirms the abort`;
    if (!ref) throw new FenceUnconfirmed(`${stays}, but the destination is unknown: refusing to resume without a fence`);
    const cleanup = new Cleanup();
    try {
      const session = cleanup.add(await this.session(ref, 'switchover'), (s) => this.release(ref, s));
      const answer = await session.request({ type: Msg.Abort, meta: {}, data: Buffer.alloc(0) });
      if (answer.meta.state !== 'aborted' && answer.meta.state !== null) {
        throw new FenceUnconfirmed(`${stays}: the destination reports ${String(answer.meta.state)} for epoch ${ref.epoch}`);
      }
    } catch (err) {
      if (err instanceof FenceUnconfirmed) throw err;
      throw new FenceUnconfirmed(`${stays}: ${(err as Error).message}`);
    } finally {
      await cleanup.run();
    }
  }

  /**
   * After postcopy: the VM process here is gone for good. Its disk, as it was at the freeze, stays as
   * the base for moving the VM back incrementally (the latest base per VM is kept).
   */
  async finalize(ref: Pick<MigrationRef, 'vmId' | 'migrationId' | 'blockBytes'>): Promise<void> {
    const own = await this.deps.ownership.get(ref.vmId);
    if (own?.state !== 'released') throw new Error(`VM ${ref.vmId} is ${own?.state ?? 'unknown'} here; only a released VM is finalized`);
    this.active.delete(ref.migrationId);
    const id = asVmId(ref.vmId);
    await fs.rm(this.abortFile(ref.migrationId), { force: true }); // an abort that came too late
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
    this.streams.get(migrationId)?.setLimits({ bandwidthBytesPerSecond: bytesPerSecond }).catch(() => undefined);
  }

  private bandwidthOf(ref: MigrationRef): number | null {
    return this.bandwidth.has(ref.migrationId) ? this.bandwidth.get(ref.migrationId)! : ref.bandwidthBytesPerSecond ?? null;
  }

  /** A retry after the commit: the earlier attempt carried the bytes (its result was lost with it). */
  private committedBefore(): Extract<SwitchoverResult, { outcome: 'committed' }> {
    return { outcome: 'committed', staleBlocks: 0, memoryBytes: 0, diskBytes: 0, freezeMs: 0, durationMs: 0, hypervisorDowntimeMs: null, memoryIterations: 0, throttled: false };
  }

  private async committed(ref: MigrationRef, result: Extract<SwitchoverResult, { outcome: 'committed' }>, freeze: object = {}): Promise<SwitchoverResult> {
    await this.deps.ownership.release(ref.vmId, ref.epoch - 1, ref.migrationId);
    this.deps.log.info({ migrationId: ref.migrationId, vmId: ref.vmId, epoch: ref.epoch, ...result, freeze }, 'switchover committed');
    return result;
  }

  /**
   * `commitSent`: the destination commits only on the Commit request, which the source sends once the
   * whole stream was applied there. Before it left, the destination cannot run this epoch, so the
   * source stops the stream and runs the guest again even when the destination cannot be reached.
   */
  private async resolveAfterFailure(
    ref: MigrationRef,
    vm: VmHandle,
    session: DataPlaneSession,
    cause: Error,
    commitSent: boolean,
    sent: { memoryBytes: number; diskBytes: number },
  ): Promise<SwitchoverResult> {
    this.deps.log.warn({ migrationId: ref.migrationId, err: cause.message, commitSent }, 'switchover failed; finding out what the destination did');
    if (!commitSent) {
      await this.stopStream(ref.migrationId);
      await this.throwIfGone(ref.vmId);
      if ((await vm.status()).state === 'migrated') await vm.resume();
      return { outcome: 'aborted', reason: `switchover failed before the commit was asked for (${cause.message}); the VM runs on the source`, ...sent };
    }
    let answer: QueryReply;
    try {
      answer = await this.queryDestination(session);
    } catch (err) {
      throw new DestinationUnreachable(
        `VM ${ref.vmId} stays stopped on the source: the destination cannot be reached to learn whether epoch ${ref.epoch} committed (${(err as Error).message})`,
      );
    }
    if (answer.state === 'running' && answer.epoch === ref.epoch) return this.committed(ref, { ...this.committedBefore(), ...sent });
    const fenced = await session.request({ type: Msg.Abort, meta: {}, data: Buffer.alloc(0) });
    if (fenced.meta.state === 'running') return this.committed(ref, { ...this.committedBefore(), ...sent });
    await this.stopStream(ref.migrationId);
    await this.throwIfGone(ref.vmId);
    if ((await vm.status()).state === 'migrated') await vm.resume();
    return { outcome: 'aborted', reason: `switchover failed before the commit: ${cause.message}`, ...sent };
  }

  private async queryDestination(session: DataPlaneSession): Promise<QueryReply> {
    return this.requestState(session, Msg.Query);
  }

  private async requestState(session: DataPlaneSession, type: typeof Msg.Query | typeof Msg.Prepare, meta: Record<string, unknown> = {}): Promise<QueryReply> {
    const r = await session.request({ type, meta: { protocol: MIGRATION_PROTOCOL, ...meta }, data: Buffer.alloc(0) });
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
   * VmGone when the VM's process has ended: what just failed on it was its death. Its exit may be
   * recorded a moment after its connections broke, so this looks for a second before it says no.
   */
  private async throwIfGone(vmId: string): Promise<void> {
    let stopped = false;
    for (let i = 0; i < 5; i++) {
      const status = await this.deps.driver.inspect(asVmId(vmId)).catch(() => null);
      if (status?.state === 'crashed') throw new VmGone(vmId, this.deps.host, status.exit ?? null);
      if (status?.state === 'running' || status?.state === 'paused') return;
      stopped = status?.state === 'stopped'; // or crashed, its exit not recorded yet
      await sleep(200);
    }
    if (stopped) throw new VmGone(vmId, this.deps.host, null);
  }

  private async attach(vmId: string): Promise<VmHandle> {
    try {
      return await this.deps.driver.attach(asVmId(vmId));
    } catch (err) {
      if (!isHypervisorError(err, 'VmNotRunning')) throw err;
      const status = await this.deps.driver.inspect(asVmId(vmId)).catch(() => null);
      throw new VmGone(vmId, this.deps.host, status?.exit ?? null);
    }
  }

  private async session(ref: MigrationRef, stream: string, writeAheadBytes?: number): Promise<DataPlaneSession> {
    const bw = this.bandwidthOf(ref);
    let session: DataPlaneSession;
    try {
      session = await connect({
        address: ref.destinationAddress,
        secret: this.deps.secret,
        tls: this.deps.tls,
        identity: { migrationId: ref.migrationId, epoch: ref.epoch, vmId: ref.vmId, stream },
        bandwidthBytesPerSecond: bw,
        windowBytes: WINDOW_BYTES,
        ...dataPlaneLiveness(ref.destinationDeadlineSeconds ?? DEFAULTS.destinationDeadlineSeconds),
        writeAheadBytes,
        observer: this.deps.observer,
        onReconnectError: (err) => this.deps.log.warn({ migrationId: ref.migrationId, err: err.message }, 'data plane reconnect failed'),
      });
    } catch (err) {
      // Only a connection that cannot be made is worth retrying; a refusal (a wrong secret, say) is an answer.
      if (err instanceof DataPlaneError && !CONNECTION_ERRORS.has(err.code)) throw err;
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

type Run = [first: number, count: number];

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

function range(from: number, to: number): number[] {
  const out: number[] = [];
  for (let i = from; i < to; i++) out.push(i);
  return out;
}

/** Rejects with the signal's reason once it is aborted. */
function abortedWith(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    else signal.addEventListener('abort', () => reject(signal.reason), { once: true });
  });
}

function isZero(buf: Buffer): boolean {
  return buf.length <= ZEROS.length && buf.equals(ZEROS.subarray(0, buf.length));
}
