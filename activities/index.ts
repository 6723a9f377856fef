// Host-side activities. Every agent registers all of them on its own task queue (`host-<name>`);
// the workflow chooses the host by choosing the queue. Built by a factory that receives the host's
// dependencies, as in the Temporal samples.
import { ApplicationFailure, Context, getClient } from '@temporalio/activity';
import type { HypervisorDriver, VmSpec, VmStatus } from '../hypervisor/driver';
import { DEFAULT_OPS_PER_SECOND, MIGRATION_TASK_QUEUE, vmId as checkVmId, type VmId, type Workload } from '../common/types';
import { CLUSTER_SCOPE, admissionWorkflowId, hostScope, requestSlotSignal, type AdmissionState } from '../workflows/definitions';
import type { Logger } from '../common/log';
import { OwnershipConflict, type OwnershipRecord, type OwnershipStore } from '../migration/ownership';
import {
  InsufficientSpace,
  IncrementalUnavailable,
  type Destination,
  type IncrementalDecision,
  type IncrementalRequest,
  type IncomingRecord,
} from '../migration/destination';
import { DestinationUnreachable, type MigrationRef, type Progress, type Source } from '../migration/source';
import { isHypervisorError } from '../hypervisor';
import { DEFAULTS } from '../common/migration';
import { furthest, recentSamples, type StepProgress } from '../common/progress';
import { BaseInUse, BaseStore, ImStore, type BaseRecord } from '../migration/bases';
import type { AgentMetrics } from '../worker/metrics';

/** Hypervisor refusals that no retry can change. */
const PERMANENT_HYPERVISOR_ERRORS = ['VmNotFound', 'VmExists', 'InvalidArgument', 'CommandNotFound'];

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
      if (!(err instanceof ApplicationFailure && err.type === 'DestinationUnreachable')) throw err;
      const since = unreachableSince.get(ref.migrationId) ?? Date.now();
      unreachableSince.set(ref.migrationId, since);
      const deadline = ref.destinationDeadlineSeconds ?? DEFAULTS.destinationDeadlineSeconds;
      const seconds = Math.round((Date.now() - since) / 1000);
      if (seconds < deadline) throw err;
      unreachableSince.delete(ref.migrationId);
      throw ApplicationFailure.nonRetryable(`${err.message}; unreachable for ${seconds} s, past the destination deadline of ${deadline} s`, 'DestinationLost');
    }
  }

  return {
    async vmCreate(input: { vmId: string; diskBytes: number; memoryBytes: number; workload: Workload; seed?: number; opsPerSecond?: number; fill?: boolean; start?: boolean }): Promise<VmSummary> {
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
      };
      await guard(() => driver.create(spec));
      await guard(() => ownership.claimNew(input.vmId));
      if (input.start !== false) (await driver.start(id)).close();
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

    /** Run the guest to exactly `ops` operations, or `more` past where it is now, and halt it there. */
    async vmRunUntil(input: { vmId: string; ops?: number; more?: number }): Promise<VmSummary> {
      const vm = await driver.attach(asVmId(input.vmId));
      try {
        let target = input.ops;
        if (input.more !== undefined) {
          await vm.pause(); // so "now" stays now while the target is set
          target = (await vm.status()).ops + input.more;
        }
        if (target === undefined) throw ApplicationFailure.nonRetryable('vmRunUntil needs ops (a target) or more (a count)', 'InvalidArgument');
        await guard(() => vm.runUntil(target));
        for (;;) {
          const s = await vm.status();
          if (s.state === 'halted' || s.ops >= target) break;
          Context.current().heartbeat({ ops: s.ops });
          await Context.current().sleep(100);
        }
      } finally {
        vm.close();
      }
      return summary(input.vmId);
    },

    async vmHashes(input: { vmId: string }): Promise<{ disk: string; memory: string }> {
      const vm = await driver.attach(asVmId(input.vmId));
      try {
        return await vm.hashes();
      } finally {
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
      await guard(() => bases.removeUnused(input.vmId));
      await driver.destroy(asVmId(input.vmId));
    },

    // ----- admission -----

    /** Ask for a slot of this host (or of the cluster, with this agent's cluster limit). */
    async requestSlot(input: { scope: 'host' | 'cluster'; ticket: number }): Promise<void> {
      const run = Context.current().info.workflowExecution;
      if (!run) throw ApplicationFailure.nonRetryable('requestSlot is called by a migration workflow only', 'InvalidArgument');
      const scope = input.scope === 'cluster' ? CLUSTER_SCOPE : hostScope(deps.host);
      const limit = input.scope === 'cluster' ? deps.limits.cluster : deps.limits.host;
      const initial: AdmissionState = { scope, limit, holders: [], waiting: [] };
      await getClient().workflow.signalWithStart('admission', {
        workflowId: admissionWorkflowId(scope),
        taskQueue: MIGRATION_TASK_QUEUE,
        args: [initial],
        signal: requestSlotSignal,
        signalArgs: [{ holder: { workflowId: run.workflowId, runId: run.runId }, limit, ticket: input.ticket }],
      });
    },

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

    async copyMemory(input: { ref: MigrationRef; full: boolean }) {
      return precopyTransfer(input.ref, () => withHeartbeat((from, report, signal) => source.copyMemory(input.ref, input.full, from, report, signal)));
    },

    async setThrottle(input: { migrationId: string; vmId: string; fraction: number }): Promise<void> {
      await guard(() => source.setThrottle(input.vmId, input.fraction));
    },

    async switchover(input: { ref: MigrationRef; mode: 'tpm' | 'precopy' }) {
      return withHeartbeat(() => source.switchover(input.ref, input.mode));
    },

    async postcopy(ref: MigrationRef) {
      return withHeartbeat((_from, report) => source.postcopy(ref, report));
    },

    /** `final`: the migration ends with this rollback (no other destination is tried). */
    async rollbackSource(input: { ref: MigrationRef | null; vmId: string; migrationId: string; final: boolean; startedAtMs: number }) {
      const result = await guard(() => source.rollback(input.ref, input.vmId, input.migrationId));
      if (input.final) metrics.migrationEnded({ migrationId: input.migrationId, role: 'source', outcome: 'rolled-back', durationSeconds: secondsSince(input.startedAtMs) });
      return result;
    },

    async finalizeSource(input: { vmId: string; migrationId: string; blockBytes: number; startedAtMs: number }): Promise<void> {
      await guard(() => source.finalize(input));
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
      const decision = await guard(() => destination.prepare(request, incremental));
      log.info({ migrationId: input.migrationId, vmId: input.vmId, epoch: input.epoch, ...decision }, 'incoming VM prepared');
      return { dataAddress: deps.dataAddress, ...decision };
    },

    async abortDestination(input: { migrationId: string; vmId: string; epoch: number }): Promise<void> {
      await guard(() => destination.abort(input.migrationId, input.vmId, input.epoch));
      metrics.migrationEnded({ migrationId: input.migrationId, role: 'destination', outcome: 'rolled-back' });
    },

    async finishDestination(input: { migrationId: string; vmId: string }): Promise<{ downtimeMs: number | null; fetches: number; staleWaits: number }> {
      const { fetches } = await destination.finish(input.migrationId);
      const s = await driver.inspect(asVmId(input.vmId));
      metrics.migrationEnded({
        migrationId: input.migrationId,
        role: 'destination',
        outcome: 'completed',
        downtimeSeconds: s.resumeGapMs === null ? null : s.resumeGapMs / 1000,
        onDemandFetches: fetches,
      });
      return { downtimeMs: s.resumeGapMs === null ? null : Math.round(s.resumeGapMs * 10) / 10, fetches, staleWaits: s.staleWaits };
    },
  };
}

export type Activities = ReturnType<typeof createActivities>;

function secondsSince(ms: number): number {
  return Math.max(0, (Date.now() - ms) / 1000);
}

/** Errors a retry cannot fix become non-retryable failures with their own type. */
async function guard<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof OwnershipConflict) throw ApplicationFailure.nonRetryable(err.message, 'OwnershipConflict');
    if (err instanceof InsufficientSpace) throw ApplicationFailure.nonRetryable(err.message, 'InsufficientSpace');
    if (err instanceof BaseInUse) throw ApplicationFailure.nonRetryable(err.message, 'BaseInUse');
    if (err instanceof IncrementalUnavailable) throw ApplicationFailure.nonRetryable(err.message, 'IncrementalUnavailable');
    if (err instanceof DestinationUnreachable) throw ApplicationFailure.retryable(err.message, 'DestinationUnreachable');
    if (isHypervisorError(err) && PERMANENT_HYPERVISOR_ERRORS.includes(err.code)) throw ApplicationFailure.nonRetryable(err.message, err.code);
    throw err;
  }
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
    return await guard(() => fn(from, (p) => (latest = furthest(latest, p)), ctx.cancellationSignal));
  } finally {
    clearInterval(timer);
  }
}
