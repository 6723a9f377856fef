// Host-side activities. Every agent registers all of them on its own task queue (`host-<name>`);
// the workflow chooses the host by choosing the queue. Built by a factory that receives the host's
// dependencies, as in the Temporal samples.
import { ApplicationFailure, Context } from '@temporalio/activity';
import type { HypervisorDriver, StaleWaitStats, VerifyResult, VmSpec, VmStatus } from '../hypervisor/driver';
import { DEFAULT_OPS_PER_SECOND, vmId as checkVmId, type VmId, type Workload } from '../common/types';
import { requestSlotActivity } from './admission';
import type { Logger } from '../common/log';
import type { OwnershipRecord, OwnershipStore } from '../migration/ownership';
import type { Destination, IncrementalDecision, IncrementalRequest, IncomingRecord } from '../migration/destination';
import { DestinationUnreachable, dataPlaneLiveness, type MachineStateOptions, type MigrationRef, type Progress, type RollbackResult, type Source } from '../migration/source';
import { DEFAULTS } from '../common/migration';
import { furthest, recentSamples, type StepProgress } from '../common/progress';
import { BaseStore, ImStore, type BaseRecord } from '../migration/bases';
import type { AgentMetrics } from '../worker/metrics';

export interface HostDeps {
  host: string;
  home: string;
  dataAddress: string;
  driver: HypervisorDriver;
  ownership: OwnershipStore;
  source: Source;
  destination: Destination;
  log: Logger;
  metrics: AgentMetrics;
  /** How many migrations may run at once touching this host, and in the whole cluster. */
  limits: { host: number; cluster: number };
  /** The deployment's workflow task queue: its admission workflows run there. */
  taskQueue: string;
}

export interface VmSummary extends VmStatus {
  host: string;
  ownership: OwnershipRecord | null;
}

export interface SourceSummary extends VmSummary {
  incremental: { lineage: string | null; bitmapValid: boolean; blockBytes: number };
}

export type PrepareInput = Omit<IncomingRecord, 'incremental'> & { incremental: IncrementalRequest };

/** A VM id from a request: a malformed one is refused at once, not retried. */
function asVmId(value: string): VmId {
  try {
    return checkVmId(value);
  } catch (err) {
    throw ApplicationFailure.nonRetryable((err as Error).message, 'InvalidArgument');
  }
}

export function createActivities(deps: HostDeps) {
  const { driver, ownership, source, destination, log, metrics } = deps;
  const bases = new BaseStore(deps.home);
  const ims = new ImStore(deps.home);

  async function summary(vmId: string): Promise<VmSummary> {
    const id = asVmId(vmId);
    if (!(await driver.exists(id))) {
      throw ApplicationFailure.nonRetryable(`VM ${vmId} does not exist on host ${deps.host}: check the VM id and the source host (ferry vm list)`, 'VmNotFound');
    }
    return { ...(await driver.inspect(id)), host: deps.host, ownership: await ownership.get(vmId) };
  }

  /** Since when each migration's destination has been unreachable for its precopy (this agent's view). */
  const unreachableSince = new Map<string, number>();

  /**
   * Before the commit an unreachable destination is retried (an agent restarting) only up to the
   * destination deadline: past it, the transfer fails for good and the workflow rolls back, so a
   * destination host that is gone does not hold the VM's migration for the activity's whole lifetime.
   */
  async function precopyTransfer<T>(ref: MigrationRef, fn: () => Promise<T>): Promise<T> {
    try {
      const result = await fn();
      unreachableSince.delete(ref.migrationId);
      return result;
    } catch (err) {
      if (!(err instanceof DestinationUnreachable)) throw err;
      const deadlineSeconds = ref.destinationDeadlineSeconds ?? DEFAULTS.destinationDeadlineSeconds;
      // A lost session has already waited for the destination (silence, then its reconnect window): count that time too.
      const lostAt = err.lostSession ? Date.now() - dataPlaneLiveness(deadlineSeconds).lostAfterMs : Date.now();
      const since = Math.min(unreachableSince.get(ref.migrationId) ?? lostAt, lostAt);
      unreachableSince.set(ref.migrationId, since);
      const deadline = deadlineSeconds;
      const seconds = Math.round((Date.now() - since) / 1000);
      if (seconds < deadline) throw err;
      unreachableSince.delete(ref.migrationId);
      throw ApplicationFailure.nonRetryable(`${err.message}; unreachable for ${seconds} s, past the destination deadline of ${deadline} s`, 'DestinationLost');
    }
  }

  return {
    async vmCreate(input: { vmId: string; diskBytes: number; memoryBytes: number; workload: Workload; seed?: number; opsPerSecond?: number; fill?: boolean; start?: boolean; vcpus?: number; boot?: VmSpec['boot'] }): Promise<VmSummary> {
      const id = asVmId(input.vmId);
      if (await driver.exists(id)) throw ApplicationFailure.nonRetryable(`VM ${input.vmId} already exists on host ${deps.host}`, 'VmExists');
      const spec: VmSpec = {
        vmId: id,
        diskBytes: input.diskBytes,
        memoryBytes: input.memoryBytes,
        workload: input.workload,
        seed: input.seed ?? 1,
        opsPerSecond: input.opsPerSecond ?? DEFAULT_OPS_PER_SECOND[input.workload] ?? 0,
        fill: input.fill,
        ...(input.vcpus !== undefined ? { vcpus: input.vcpus } : {}),
        ...(input.boot ? { boot: input.boot } : {}),
      };
      await driver.create(spec);
      let claimed = false;
      try {
        await ownership.claimNew(input.vmId);
        claimed = true;
        if (input.start !== false) (await driver.start(id)).close();
      } catch (err) {
        // Half a VM (its files written, its process not started) is rolled back: the id stays free.
        log.warn({ vmId: input.vmId, err: String(err) }, 'VM creation failed: removing what it wrote');
        await driver.destroy(id).catch((e: unknown) => log.warn({ vmId: input.vmId, err: String(e) }, 'could not remove the half-created VM'));
        if (claimed) await ownership.remove(input.vmId);
        throw err;
      }
      return summary(input.vmId);
    },

    async vmList(): Promise<VmSummary[]> {
      const all = await driver.list();
      return Promise.all(all.map(async (s) => ({ ...s, host: deps.host, ownership: await ownership.get(s.vmId) })));
    },

    async vmInspect(input: { vmId: string }): Promise<VmSummary> {
      return summary(input.vmId);
    },

    /** Start a VM whose process is not running (after a crash of the VM process, say). */
    async vmStart(input: { vmId: string }): Promise<VmSummary> {
      await summary(input.vmId);
      (await driver.start(asVmId(input.vmId))).close();
      return summary(input.vmId);
    },

    /** Nothing of the VM stays: its process, files, ownership record and incremental-migration records. */
    async vmDestroy(input: { vmId: string }): Promise<void> {
      await summary(input.vmId);
      await driver.destroy(asVmId(input.vmId));
      await ownership.remove(input.vmId);
      await ims.remove(input.vmId);
      await bases.remove(input.vmId);
    },

    async vmPause(input: { vmId: string }): Promise<VmSummary> {
      await summary(input.vmId);
      const vm = await driver.attach(asVmId(input.vmId));
      try {
        await vm.pause();
      } finally {
        vm.close();
      }
      return summary(input.vmId);
    },

    async vmResume(input: { vmId: string }): Promise<VmSummary> {
      await summary(input.vmId);
      const vm = await driver.attach(asVmId(input.vmId));
      try {
        await vm.resume();
      } finally {
        vm.close();
      }
      return summary(input.vmId);
    },

    /** The guest's own check of its data (the simulator: a comparison with a reference run; it halts the guest). */
    async vmVerify(input: { vmId: string }): Promise<VerifyResult & { host: string; vmId: string }> {
      await summary(input.vmId);
      const vm = await driver.attach(asVmId(input.vmId));
      const beat = setInterval(() => Context.current().heartbeat(), 1000);
      try {
        return { ...(await vm.verify()), host: deps.host, vmId: input.vmId };
      } finally {
        clearInterval(beat);
        vm.close();
      }
    },

    async baseList(): Promise<BaseRecord[]> {
      return bases.list();
    },

    async baseDelete(input: { vmId: string }): Promise<void> {
      const base = await bases.get(input.vmId);
      if (!base) throw ApplicationFailure.nonRetryable(`host ${deps.host} holds no base of VM ${input.vmId} (ferry bases list)`, 'BaseNotFound');
      if (await driver.exists(asVmId(input.vmId))) {
        throw ApplicationFailure.nonRetryable(`VM ${input.vmId} is defined on host ${deps.host}: its disk is not a base here`, 'BaseInUse');
      }
      await bases.removeUnused(input.vmId);
      await driver.destroy(asVmId(input.vmId));
    },

    // ----- admission -----

    /** Ask for a slot of this host (or of the cluster, with this agent's cluster limit). */
    requestSlot: requestSlotActivity(deps.host, deps.limits, deps.taskQueue),

    // ----- source side -----

    async inspectSource(input: { vmId: string; migrationId: string }): Promise<SourceSummary> {
      const s = await summary(input.vmId);
      const own = s.ownership;
      if (!['running', 'paused', 'halted'].includes(s.state) || own?.state !== 'running') {
        throw ApplicationFailure.nonRetryable(
          `VM ${input.vmId} is not running on host ${deps.host} (process ${s.state}, ownership ${own ? `${own.state} at epoch ${own.epoch}` : 'none'}): start it, or name the host it runs on as the source`,
          'VmNotRunning',
        );
      }
      return { ...s, incremental: await source.incrementalState(input.vmId) };
    },

    async copyDiskFirstPass(input: { ref: MigrationRef; incremental: boolean }) {
      return precopyTransfer(input.ref, () => withHeartbeat((from, report, signal) => source.copyDiskFirstPass(input.ref, input.incremental, from, report, signal)));
    },

    async copyDiskDirty(ref: MigrationRef) {
      return precopyTransfer(ref, () => withHeartbeat((_from, report, signal) => source.copyDiskDirty(ref, signal, report)));
    },

    async setThrottle(input: { migrationId: string; vmId: string; fraction: number }): Promise<void> {
      await source.setThrottle(input.vmId, input.fraction);
    },

    /** Memory precopy and the freeze, in one activity (no Temporal round trip inside the freeze). */
    async switchover(input: { ref: MigrationRef; mode: 'tpm' | 'precopy' } & MachineStateOptions) {
      return withHeartbeat((_from, report) => source.switchover(input.ref, input.mode, input, report));
    },

    /** An abort while the memory precopy runs: stops the stream unless the freeze began. */
    async cancelMachineState(input: { migrationId: string }): Promise<{ cancelled: boolean }> {
      return source.cancelMachineState(input.migrationId);
    },

    async forceSwitchover(input: { migrationId: string }): Promise<void> {
      await source.forceSwitchover(input.migrationId);
    },

    async postcopy(ref: MigrationRef) {
      return withHeartbeat((_from, report) => source.postcopy(ref, report));
    },

    /** `final`: the migration ends with this rollback (no other destination is tried). */
    async rollbackSource(input: { ref: MigrationRef | null; vmId: string; migrationId: string; wasRunning: boolean; final: boolean; startedAtMs: number }): Promise<RollbackResult> {
      const result = await source.rollback(input.ref, input.vmId, input.migrationId, input.wasRunning);
      if (input.final && result.state !== 'crashed') {
        metrics.migrationEnded({ migrationId: input.migrationId, role: 'source', outcome: 'rolled-back', durationSeconds: secondsSince(input.startedAtMs) });
      }
      return result;
    },

    /**
     * The operator declared the destination lost after the Final message (ferry resolve), and the
     * workflow has recorded the fence of its epoch (the revokeDestination workflow): resume here.
     */
    async resumeSourceAfterLoss(input: { ref: MigrationRef; wasRunning: boolean; startedAtMs: number }): Promise<RollbackResult> {
      const { ref } = input;
      log.warn({ destination: ref.destinationHost, epoch: ref.epoch }, 'resuming the source VM without the destination\'s answer: an operator declared the destination lost');
      const result = await source.rollback(ref, ref.vmId, ref.migrationId, input.wasRunning, { destinationLost: true });
      metrics.migrationEnded({ migrationId: ref.migrationId, role: 'source', outcome: 'rolled-back', durationSeconds: secondsSince(input.startedAtMs) });
      return result;
    },

    async finalizeSource(input: { vmId: string; migrationId: string; blockBytes: number; startedAtMs: number }): Promise<void> {
      await source.finalize(input);
      metrics.migrationEnded({ migrationId: input.migrationId, role: 'source', outcome: 'completed', durationSeconds: secondsSince(input.startedAtMs) });
    },

    /** The workflow failed (neither completed nor rolled back): record it where the migration started. */
    async migrationFailed(input: { vmId: string; migrationId: string; reason: string; startedAtMs: number }): Promise<void> {
      log.error({ reason: input.reason }, 'migration failed');
      metrics.migrationEnded({ migrationId: input.migrationId, role: 'source', outcome: 'failed', durationSeconds: secondsSince(input.startedAtMs) });
    },

    async setBandwidth(input: { migrationId: string; vmId: string; bytesPerSecond: number | null }): Promise<void> {
      source.setBandwidth(input.migrationId, input.bytesPerSecond);
    },

    // ----- destination side -----

    async prepareDestination(input: PrepareInput): Promise<{ dataAddress: string } & IncrementalDecision> {
      const { incremental, ...request } = input;
      const decision = await destination.prepare(request, incremental);
      log.info({ migrationId: input.migrationId, vmId: input.vmId, epoch: input.epoch, ...decision }, 'incoming VM prepared');
      return { dataAddress: deps.dataAddress, ...decision };
    },

    async abortDestination(input: { migrationId: string; vmId: string; epoch: number }): Promise<void> {
      await destination.abort(input.migrationId, input.vmId, input.epoch);
      metrics.migrationEnded({ migrationId: input.migrationId, role: 'destination', outcome: 'rolled-back' });
    },

    /** This host was declared lost during the migration and the source resumed: destroy the copy here. */
    async revokeDestination(input: { migrationId: string; vmId: string; epoch: number }): Promise<void> {
      if (await destination.revoke(input.migrationId, input.vmId, input.epoch)) {
        metrics.migrationEnded({ migrationId: input.migrationId, role: 'destination', outcome: 'rolled-back' });
      }
    },

    async finishDestination(input: { migrationId: string; vmId: string }): Promise<DestinationFacts> {
      const { fetches, staleWaits, measured } = await destination.finish(input.migrationId);
      const postcopyMs =
        measured.committedAtMs !== undefined && measured.postcopyDoneAtMs !== undefined ? Math.max(0, measured.postcopyDoneAtMs - measured.committedAtMs) : null;
      const downtimeMs = measured.downtimeMs ?? null;
      metrics.migrationEnded({
        migrationId: input.migrationId,
        role: 'destination',
        outcome: 'completed',
        downtimeSeconds: downtimeMs === null ? null : downtimeMs / 1000,
        onDemandFetches: fetches,
      });
      return { downtimeMs, fetches, staleWaits, postcopyMs };
    },
  };
}

/** What only the destination saw of a migration. */
export interface DestinationFacts {
  /** Guest-observed freeze: last heartbeat on the source to the first one here (ms). */
  downtimeMs: number | null;
  fetches: number;
  staleWaits: StaleWaitStats;
  /** From the commit to the last stale block's arrival, measured here (ms); null if unknown. */
  postcopyMs: number | null;
}

export type Activities = ReturnType<typeof createActivities>;

function secondsSince(ms: number): number {
  return Math.max(0, (Date.now() - ms) / 1000);
}

/**
 * Run a long step with a heartbeat every second carrying its latest progress, never behind an
 * earlier one, and samples of its bytes for the rate (common/progress.ts); a retry starts from the
 * details of the last heartbeat. Cancellation (abort) reaches the step through the signal.
 */
async function withHeartbeat<T>(fn: (from: Progress, report: (p: Progress) => void, signal: AbortSignal) => Promise<T>): Promise<T> {
  const ctx = Context.current();
  const last = ctx.info.heartbeatDetails as StepProgress | undefined;
  const from: Progress = last ? furthest(last, last) : { cursor: 0, bytes: 0, items: 0 };
  let latest = from;
  let samples = last?.samples ?? [];
  const beat = (): void => {
    const now = Date.now();
    samples = recentSamples([...samples, { atMs: now, bytes: latest.bytes }], now);
    ctx.heartbeat({ ...latest, samples } satisfies StepProgress);
  };
  beat();
  const timer = setInterval(beat, 1000);
  try {
    return await fn(from, (p) => (latest = furthest(latest, p)), ctx.cancellationSignal);
  } finally {
    clearInterval(timer);
  }
}
