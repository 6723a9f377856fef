// migrateVm: the three-phase migration (precopy, freeze-and-copy, postcopy) of one VM, as a
// deterministic orchestration. Every step that touches a host is an activity on that host's queue.
import {
  ApplicationFailure,
  CancellationScope,
  ParentClosePolicy,
  TimeoutFailure,
  allHandlersFinished,
  condition,
  isCancellation,
  log,
  proxyActivities,
  setCurrentDetails,
  setHandler,
  sleep,
  startChild,
  upsertMemo,
  upsertSearchAttributes,
  workflowInfo,
  type ActivityOptions,
} from '@temporalio/workflow';
import type { Activities } from '../activities';
import type { MigrationRef, RollbackResult, SwitchoverResult } from '../migration/source';
import {
  SOURCE_STEPS,
  formatRetry,
  initialProgress,
  type DestinationLostResolution,
  type MigrateVmInput,
  type MigrationPhase,
  type MigrationProgress,
  type MigrationReport,
  type StepFailure,
} from '../common/migration';
import { hostTaskQueue } from '../common/types';
import { describeExit } from '../hypervisor/exit';
import {
  CLUSTER_SCOPE,
  SearchAttributes,
  abortUpdate,
  approveCutoverUpdate,
  hostScope,
  progressQuery,
  resolveDestinationLostUpdate,
  setBandwidthSignal,
  stepRetryingSignal,
} from './definitions';
import { displayPercent, recentSamples, type ProgressStage, type ProgressTrack } from '../common/progress';
import { bandwidthError, validateInput } from './validate';
import { Slots } from './slots';
import { fenceDestination, fenceWorkflowId, revokeDestination, revokeWorkflowId } from './fence-destination';

const GiB = 1024 ** 3;
/** Small VMs still get time for the orchestration itself. */
const MIN_COMPLETION_TIMEOUT_MS = 10 * 60_000;
/** At most this many disk+memory round pairs right before the freeze. */
const FINAL_ROUNDS = 4;
/** The downtime limit of a forced switchover (completion timeout, `onCompletionTimeout: switchover`). */
const FORCED_DOWNTIME_MS = 3_600_000;
/**
 * How long a rollback waits for the destination to fence its epoch before it lets a background
 * workflow go on trying: before the switchover the VM runs on the source, so nothing waits for it.
 */
const FENCE_WAIT_SECONDS = 15;
const FENCE_WAIT = `${FENCE_WAIT_SECONDS} seconds`;
/** A step that failed after the commit is tried again this often (the migration can only go forward). */
const ROLL_FORWARD_RETRY = '30 seconds';
const PRE_COMMIT: MigrationPhase[] = ['validating', 'waiting-for-slot', 'preparing', 'disk-precopy', 'disk-dirty-rounds', 'memory-precopy', 'awaiting-cutover', 'converging'];

function hostActivities(host: string, deadlineSeconds: number) {
  const base: ActivityOptions = { taskQueue: hostTaskQueue(host) };
  const quick: ActivityOptions = {
    ...base,
    startToCloseTimeout: '1 minute',
    scheduleToCloseTimeout: `${deadlineSeconds} seconds`,
    retry: { initialInterval: '500ms', maximumInterval: '5 seconds' },
  };
  const transfer: ActivityOptions = {
    ...base,
    startToCloseTimeout: '12 hours',
    heartbeatTimeout: '5 seconds',
    scheduleToCloseTimeout: '24 hours',
    retry: { initialInterval: '500ms', maximumInterval: '5 seconds' },
  };
  // After the commit there is no way back: keep trying until the hosts return.
  const rollForward: ActivityOptions = {
    ...base,
    startToCloseTimeout: '12 hours',
    heartbeatTimeout: '5 seconds',
    retry: { initialInterval: '500ms', maximumInterval: '30 seconds' },
  };
  const fence: ActivityOptions = { ...quick, startToCloseTimeout: FENCE_WAIT, scheduleToCloseTimeout: FENCE_WAIT };
  return {
    quick: proxyActivities<Activities>(quick),
    transfer: proxyActivities<Activities>(transfer),
    rollForward: proxyActivities<Activities>(rollForward),
    fence: proxyActivities<Activities>(fence),
    options: { quick, transfer, rollForward },
  };
}

/** The migration cannot go on because its VM's process died on the source: it fails, and says how the VM is left. */
class SourceVmCrashed extends Error {}

export async function migrateVm(input: MigrateVmInput): Promise<MigrationReport> {
  const slots = new Slots();
  try {
    return await migrate(input, slots);
  } catch (err) {
    await CancellationScope.nonCancellable(() => slots.release());
    await recordFailure(input, err);
    throw err;
  }
}

/** The whole run id: run ids are time-ordered, so a prefix of two quick retries can be equal. */
function currentMigrationId(): string {
  const info = workflowInfo();
  return `${info.workflowId}-${info.runId}`;
}

/** Tell the source host, which keeps the migration's metrics, that the migration failed. Best effort, and short. */
async function recordFailure(input: MigrateVmInput, err: unknown): Promise<void> {
  let sourceHost: string;
  try {
    sourceHost = validateInput(input).sourceHost;
  } catch {
    return; // invalid input: the migration never reached a host
  }
  const { migrationFailed } = proxyActivities<Activities>({ taskQueue: hostTaskQueue(sourceHost), scheduleToCloseTimeout: '10 seconds' });
  const reason = err instanceof Error ? err.message : String(err);
  await CancellationScope.nonCancellable(() =>
    migrationFailed({ vmId: input.vmId, migrationId: currentMigrationId(), reason, startedAtMs: workflowInfo().startTime.getTime() }),
  ).catch(() => undefined);
}

async function migrate(input: MigrateVmInput, slots: Slots): Promise<MigrationReport> {
  const cfg = validateInput(input);
  const migrationId = currentMigrationId();
  const startedAt = workflowInfo().startTime.getTime();
  const src = hostActivities(cfg.sourceHost, cfg.destinationDeadlineSeconds);

  let phase: MigrationPhase = 'validating';
  let committed = false;
  let approved = cfg.cutover === 'auto';
  let forceSwitchover = false;
  let abortReason: string | null = null;
  let bandwidth = cfg.bandwidthBytesPerSecond;
  let destination: string | null = null;
  let ref: MigrationRef | null = null;
  /** Set while the switchover waits for a destination that does not answer, after the Final message may have left. */
  let lostDestination: { host: string; epoch: number } | null = null;
  let resolution: MigrationReport['resolution'] | null = null;
  const progress: MigrationProgress = initialProgress(cfg.vmId, cfg.sourceHost, cfg.mode);
  const track: ProgressTrack = {
    plan: { diskBytes: 0, memoryBytes: 0, blockBytes: cfg.blockBytes, postcopy: cfg.mode === 'tpm' },
    position: { stage: 'prepare', round: 0 },
    staleBlocks: 0,
    samples: [],
    floor: 0,
  };
  let convergingRound = 0;
  const report: MigrationReport = {
    vmId: cfg.vmId,
    outcome: 'completed',
    sourceHost: cfg.sourceHost,
    destinationHost: null,
    failedDestinations: [],
    mode: cfg.mode,
    incremental: false,
    skippedBlocks: 0,
    epoch: 0,
    totalMs: 0,
    downtimeMs: null,
    diskBytesSent: 0,
    memoryBytesSent: 0,
    diskRounds: 0,
    memoryRounds: 0,
    postcopyMs: 0,
    onDemandFetches: 0,
    staleWaits: { waits: 0, longestWaitMs: 0, totalWaitMs: 0 },
    hypervisorDowntimeMs: null,
    throttled: false,
    diskPrecopyResumedFromBlock: 0,
    blockBytes: cfg.blockBytes,
    coldMigration: false,
  };

  let preCommitScope: CancellationScope | null = null;

  setHandler(progressQuery, () => ({ ...progress, percent: track.floor, track }));
  setHandler(
    approveCutoverUpdate,
    () => {
      approved = true;
      return { accepted: true as const, phase };
    },
    {
      validator: () => {
        if (cfg.cutover !== 'manual') {
          throw new Error(`migration of ${cfg.vmId} switches over on its own (cutover auto): there is nothing to approve; migrate with --cutover manual to approve the switchover by hand`);
        }
        if (committed || !PRE_COMMIT.includes(phase)) throw new Error(`migration of ${cfg.vmId} is in phase ${phase}: approve is possible only before the switchover`);
      },
    },
  );
  setHandler(stepRetryingSignal, (retry) => {
    progress.retrying = retry;
    showDetails();
  });
  setHandler(
    resolveDestinationLostUpdate,
    (r: DestinationLostResolution) => {
      const lost = lostDestination!;
      resolution = { reason: r.reason.trim(), by: r.by, host: lost.host, at: new Date(workflowNow()).toISOString() };
      report.resolution = resolution;
      upsertMemo({ resolution });
      log.warn(`destination ${lost.host} declared lost by ${resolution.by}: ${resolution.reason}`, { vmId: cfg.vmId, migrationId, epoch: lost.epoch });
      return { accepted: true as const, host: lost.host, epoch: lost.epoch };
    },
    {
      validator: (r: DestinationLostResolution) => {
        if (!lostDestination || resolution) {
          throw new Error(
            `migration of ${cfg.vmId} is in phase ${phase} and does not wait for a lost destination: --destination-lost applies only while the switchover waits for a destination that stopped answering after the Final message left`,
          );
        }
        if (typeof r?.reason !== 'string' || r.reason.trim() === '') throw new Error('say why the destination is lost for good: --reason TEXT (for example "host powered off")');
        if (typeof r.by !== 'string' || r.by === '') throw new Error('the resolution must name who decided (by)');
      },
    },
  );
  setHandler(setBandwidthSignal, (bps) => {
    // A signal cannot be refused to its sender (FerryClient checks first): a bad value is dropped, never applied.
    const error = bandwidthError(bps);
    if (error) return log.warn(`setBandwidth ignored: ${error}`, { vmId: cfg.vmId, migrationId });
    bandwidth = bps;
    // Later activities carry it too: a restarted source agent must not fall back to the first limit.
    if (ref) ref = { ...ref, bandwidthBytesPerSecond: bps };
    void src.quick.setBandwidth({ migrationId, vmId: cfg.vmId, bytesPerSecond: bps }).catch(() => undefined);
  });
  setHandler(
    abortUpdate,
    async (reason) => {
      const before = abortReason;
      // Set first: the switchover may come back aborted before the cancellation's answer does.
      abortReason = reason || 'aborted by operator';
      if (phase === 'memory-precopy') {
        // The stream runs inside the switchover activity: the source stops it unless the freeze began.
        const { cancelled } = await src.quick.cancelMachineState({ migrationId });
        if (!cancelled && before === null) {
          abortReason = null;
          throw ApplicationFailure.nonRetryable(`migration of ${cfg.vmId}: the freeze has begun, it can only complete`, 'AbortRefused');
        }
      }
      preCommitScope?.cancel();
      return { accepted: true, phase };
    },
    {
      validator: (_reason: string) => {
        if (committed || !PRE_COMMIT.includes(phase)) {
          throw new Error(
            committed
              ? `migration of ${cfg.vmId} is past the commit point (phase ${phase}): it can only complete`
              : `migration of ${cfg.vmId} is in phase ${phase}: abort is possible only before the switchover`,
          );
        }
      },
    },
  );

  function setPhase(next: MigrationPhase, message: string): void {
    phase = next;
    progress.phase = next;
    progress.message = message;
    upsertSearchAttributes([{ key: SearchAttributes.phase, value: next }]);
    updatePercent();
    log.info(message, { phase: next, vmId: cfg.vmId, migrationId });
  }

  /** The Web UI's current details: the phase, what happens, and the step being retried (if one is). */
  function showDetails(): void {
    setCurrentDetails(`**${phase}**: ${progress.message}${progress.retrying ? `\n\n${formatRetry(progress.retrying)}` : ''}`);
  }

  /**
   * A step ended (or the phase moved on): nothing is being retried now. Percent, rate and ETA come
   * from the progress model (common/progress.ts): the workflow keeps its track.
   */
  function updatePercent(stepDone = 0): void {
    progress.retrying = null;
    showDetails();
    // The report counts every round, the switchover and the postcopy: the progress shows the same.
    progress.disk.sentBytes = report.diskBytesSent;
    progress.memory.sentBytes = report.memoryBytesSent;
    track.floor = displayPercent(track.plan, { ...track.position, stepDone }, track.floor);
  }

  /** A transfer starts: the position moves, and the bytes so far are a rate sample. */
  function stage(next: ProgressStage, round = 0): void {
    track.position = { stage: next, round };
    sample();
    updatePercent();
  }

  /** A transfer finished: its step is done, and its bytes are a rate sample. */
  function transferred(): void {
    sample();
    updatePercent(1);
  }

  function sample(): void {
    const now = workflowNow();
    track.samples = recentSamples([...track.samples, { atMs: now, bytes: report.diskBytesSent + report.memoryBytesSent }], now);
  }

  upsertSearchAttributes([
    { key: SearchAttributes.vmId, value: cfg.vmId },
    { key: SearchAttributes.sourceHost, value: cfg.sourceHost },
    { key: SearchAttributes.mode, value: cfg.mode },
    { key: SearchAttributes.phase, value: phase },
  ]);
  setPhase('validating', `checking that VM ${cfg.vmId} runs on ${cfg.sourceHost}`);
  const vm = await src.quick.inspectSource({ vmId: cfg.vmId, migrationId });
  const sourceEpoch = vm.ownership!.epoch;
  /** A rollback gives the VM back the run state it had: a paused VM stays paused. */
  const wasRunning = vm.state !== 'paused';
  report.coldMigration = !wasRunning;
  const epoch = sourceEpoch + 1;
  progress.epoch = epoch;
  report.epoch = epoch;
  progress.disk.totalBytes = vm.diskBytes;
  progress.memory.totalBytes = vm.memoryBytes;
  track.plan = { ...track.plan, diskBytes: vm.diskBytes, memoryBytes: vm.memoryBytes };
  upsertMemo({ vm: cfg.vmId, source: cfg.sourceHost, candidates: cfg.destinationHosts.join(','), diskBytes: vm.diskBytes, memoryBytes: vm.memoryBytes, mode: cfg.mode });

  // Completion timeout: measured from the start, per GiB of disk and memory.
  const timeoutMs = Math.max(MIN_COMPLETION_TIMEOUT_MS, ((vm.diskBytes + vm.memoryBytes) / GiB) * cfg.completionTimeoutSecondsPerGiB * 1000);
  const deadline = CancellationScope.nonCancellable(() => sleep(timeoutMs));
  void deadline.then(() => {
    if (committed || !PRE_COMMIT.includes(phase)) return;
    if (cfg.onCompletionTimeout === 'switchover') {
      forceSwitchover = true;
      if (phase === 'memory-precopy') void src.quick.forceSwitchover({ migrationId }).catch(() => undefined);
    } else {
      abortReason = `completion timeout of ${Math.round(timeoutMs / 1000)} s expired before the switchover`;
      preCommitScope?.cancel();
      if (phase === 'memory-precopy') void src.quick.cancelMachineState({ migrationId }).catch(() => undefined);
    }
  });

  /** Everything up to the commit point, against one destination. Throws to roll back. */
  async function precopy(dest: string): Promise<SwitchoverResult | DestinationLost> {
    const dst = hostActivities(dest, cfg.destinationDeadlineSeconds);
    await slots.acquire(
      [
        { scope: CLUSTER_SCOPE, request: (ticket) => src.quick.requestSlot({ scope: 'cluster', ticket }) },
        { scope: hostScope(cfg.sourceHost), request: (ticket) => src.quick.requestSlot({ scope: 'host', ticket }) },
        { scope: hostScope(dest), request: (ticket) => dst.quick.requestSlot({ scope: 'host', ticket }) },
      ],
      (scope) => setPhase('waiting-for-slot', `waiting for a free migration slot (${scope === CLUSTER_SCOPE ? 'cluster-wide limit' : `limit of ${scope}`})`),
    );
    setPhase('preparing', `preparing an incoming VM on ${dest}`);
    const prepared = await dst.quick.prepareDestination({
      migrationId,
      vmId: cfg.vmId,
      epoch,
      sourceHost: cfg.sourceHost,
      blockBytes: cfg.blockBytes,
      spec: { vmId: vm.vmId, diskBytes: vm.diskBytes, memoryBytes: vm.memoryBytes, workload: vm.workload, seed: vm.seed, opsPerSecond: vm.opsPerSecond, fill: vm.fill },
      incremental: { policy: cfg.incremental, ...vm.incremental },
    });
    report.incremental = prepared.incremental;
    report.incrementalFallbackReason = prepared.reason;
    progress.incremental = { incremental: prepared.incremental, fallbackReason: prepared.reason ?? null };
    upsertSearchAttributes([{ key: SearchAttributes.incremental, value: prepared.incremental }]);
    upsertMemo({ incremental: prepared.incremental, incrementalFallbackReason: prepared.reason ?? null });
    if (prepared.reason) log.info(`full copy: ${prepared.reason}`, { vmId: cfg.vmId, migrationId });
    ref = {
      migrationId,
      vmId: cfg.vmId,
      epoch,
      destinationAddress: prepared.dataAddress,
      destinationHost: dest,
      blockBytes: cfg.blockBytes,
      bandwidthBytesPerSecond: bandwidth,
      destinationDeadlineSeconds: cfg.destinationDeadlineSeconds,
    };

    setPhase('disk-precopy', `copying the ${prepared.incremental ? 'blocks written since the last migration' : 'disk'} of ${cfg.vmId} to ${dest}`);
    stage('disk-first-pass');
    const full = await src.transfer.copyDiskFirstPass.executeWithOptions(
      { ...src.options.transfer, summary: prepared.incremental ? 'disk precopy: incremental pass (blocks written since)' : 'disk precopy: full pass' },
      [{ ref, incremental: prepared.incremental }],
    );
    report.skippedBlocks = full.skippedBlocks;
    report.diskBytesSent += full.bytes;
    report.diskPrecopyResumedFromBlock = full.resumedFromBlock;
    transferred();

    setPhase('disk-dirty-rounds', 'copying the blocks written during the full pass');
    let throttle = 0;
    let previous = Infinity;
    let stalls = 0;
    for (let round = 1; round <= cfg.convergence.maxRounds && !forceSwitchover; round++) {
      progress.round = round;
      stage('disk-rounds', round);
      const r = await src.transfer.copyDiskDirty.executeWithOptions({ ...src.options.transfer, summary: `disk precopy round ${round}` }, [ref]);
      report.diskRounds++;
      report.diskBytesSent += r.bytes;
      progress.disk.dirtyBlocks = r.items;
      progress.disk.remainingBytes = r.items * cfg.blockBytes;
      progress.dirtyBytesPerSecond = r.durationMs > 0 ? Math.round((r.bytes / r.durationMs) * 1000) : 0;
      progress.message = `disk precopy round ${round}: ${r.items} blocks`;
      transferred();
      if (r.items <= cfg.convergence.dirtyBlockThreshold) break;
      stalls = r.items >= previous * 0.9 ? stalls + 1 : 0;
      previous = r.items;
      if (stalls >= 2) {
        if (cfg.convergence.onStall === 'switchover' || throttle >= 0.8) break;
        throttle = Math.min(0.8, throttle + 0.2);
        report.throttled = true;
        stalls = 0;
        await src.quick.setThrottle({ migrationId, vmId: cfg.vmId, fraction: throttle });
      }
    }

    while (!approved && !forceSwitchover) {
      setPhase('awaiting-cutover', `disk copied; waiting for approval to switch over to ${dest} (ferry approve ${cfg.vmId})`);
      await condition(() => approved || forceSwitchover, '5 seconds');
      if (!approved && !forceSwitchover) {
        stage('converging', ++convergingRound);
        const r = await src.transfer.copyDiskDirty.executeWithOptions({ ...src.options.transfer, summary: 'disk round while awaiting cutover' }, [ref]);
        report.diskRounds++;
        report.diskBytesSent += r.bytes;
        transferred();
      }
    }
    if (cfg.cutover === 'manual') await converge(); // the set grew while it waited
    setPhase('memory-precopy', `copying the memory and device state of ${cfg.vmId}, then the freeze`);
    stage('memory');
    const machine = { downtimeTargetMs: forceSwitchover ? FORCED_DOWNTIME_MS : cfg.downtimeTargetMs, autoConverge: cfg.convergence.onStall === 'throttle' };
    return CancellationScope.nonCancellable(() => switchover(dest, machine));

    /** Disk rounds after an approval, before the memory precopy: the freeze carries as little as possible. */
    async function converge(): Promise<void> {
      setPhase('converging', `last disk rounds before the freeze (${cfg.vmId} to ${dest})`);
      let lastDiskItems = Infinity;
      for (let round = 1; round <= FINAL_ROUNDS && !forceSwitchover; round++) {
        stage('converging', ++convergingRound);
        const d = await src.transfer.copyDiskDirty.executeWithOptions({ ...src.options.transfer, summary: `disk: round ${round} before the freeze` }, [ref!]);
        report.diskRounds++;
        report.diskBytesSent += d.bytes;
        progress.disk.dirtyBlocks = d.items;
        transferred();
        // In tpm mode stale blocks go to the postcopy, not into the freeze: once the set stops
        // halving, more rounds only send the same blocks again.
        if (d.items <= cfg.convergence.dirtyBlockThreshold || (cfg.mode === 'tpm' && d.items > lastDiskItems / 2)) break;
        if (d.items >= lastDiskItems * 0.9 && cfg.convergence.onStall === 'throttle' && throttle < 0.8) {
          throttle = Math.min(0.8, throttle + 0.2);
          report.throttled = true;
          await src.quick.setThrottle({ migrationId, vmId: cfg.vmId, fraction: throttle });
        }
        lastDiskItems = d.items;
      }
    }
  }

  /**
   * The freeze-and-copy. It never gives up (it can only learn the outcome from the destination), but
   * while the destination cannot be reached the workflow says so, instead of only retrying; an
   * operator may then declare the destination lost (ferry resolve).
   */
  async function switchover(dest: string, machine: { downtimeTargetMs: number; autoConverge: boolean }): Promise<SwitchoverResult | DestinationLost> {
    const options: ActivityOptions = {
      ...src.options.rollForward,
      retry: { ...src.options.rollForward.retry, nonRetryableErrorTypes: ['DestinationUnreachable'] },
      summary: `switchover to ${dest}`,
    };
    for (;;) {
      try {
        const result = await src.rollForward.switchover.executeWithOptions(options, [{ ref: ref!, mode: cfg.mode, ...machine }]);
        lostDestination = null;
        return result;
      } catch (err) {
        const cause = (err as { cause?: unknown }).cause;
        if (!(cause instanceof ApplicationFailure && cause.type === 'DestinationUnreachable')) throw err;
        lostDestination = { host: dest, epoch };
        progress.message =
          `waiting for destination ${dest} to answer (switchover of epoch ${epoch}): ${cause.message}. ` +
          `Only if ${dest} is powered off or fenced for good: ferry resolve ${cfg.vmId} --destination-lost --reason TEXT`;
        showDetails();
        log.warn(progress.message, { vmId: cfg.vmId, migrationId });
        if (await condition(() => resolution !== null, '10 seconds')) return { outcome: 'destination-lost' };
      }
    }
  }

  /**
   * The operator declared the destination lost: record the fence of its epoch (a workflow that runs
   * until the lost host's agent destroyed its copy), and only then resume the source.
   */
  async function resumeAfterLoss(dest: string): Promise<void> {
    const r = resolution!;
    setPhase('rolling-back', `destination ${dest} declared lost by ${r.by} (${r.reason}): fencing its epoch ${epoch}, then resuming ${cfg.vmId} on ${cfg.sourceHost}`);
    await CancellationScope.nonCancellable(async () => {
      await startChild(revokeDestination, {
        workflowId: revokeWorkflowId(migrationId, dest),
        args: [{ host: dest, migrationId, vmId: cfg.vmId, epoch, by: r.by, at: r.at, reason: r.reason }],
        parentClosePolicy: ParentClosePolicy.ABANDON,
      });
      await untilDone('resuming the source', cfg.sourceHost, () => src.quick.resumeSourceAfterLoss({ ref: ref!, wasRunning, startedAtMs: startedAt }));
    });
  }

  /** `final`: the migration ends rolled back (no other destination will be tried). */
  async function rollBack(dest: string | null, reason: string, final: boolean): Promise<RollbackResult> {
    setPhase('rolling-back', `rolling back: ${reason}`);
    return CancellationScope.nonCancellable(async () => {
      if (dest) {
        const dst = hostActivities(dest, cfg.destinationDeadlineSeconds);
        // Fence first: the source resumes only once the destination can never run this epoch.
        await dst.fence.abortDestination({ migrationId, vmId: cfg.vmId, epoch }).catch(async (err) => {
          log.warn(`could not fence destination ${dest} now (${stepFailure(err, { source: cfg.sourceHost, other: dest }, FENCE_WAIT_SECONDS).message}): the fence goes on in the background until it answers`, {
            vmId: cfg.vmId,
            migrationId,
          });
          await startChild(fenceDestination, {
            workflowId: fenceWorkflowId(migrationId, dest),
            args: [{ host: dest, migrationId, vmId: cfg.vmId, epoch }],
            parentClosePolicy: ParentClosePolicy.ABANDON,
          });
        });
      }
      // A stopped source with an unreachable destination waits (resuming could make two copies); the message says why.
      return untilDone('rolling back', cfg.sourceHost, () => src.quick.rollbackSource({ ref, vmId: cfg.vmId, migrationId, wasRunning, final, startedAtMs: startedAt }));
    });
  }

  /** A step that must happen: tried again every 10 s while it fails, saying why. */
  async function untilDone<T>(what: string, host: string, fn: () => Promise<T>): Promise<T> {
    for (;;) {
      try {
        return await fn();
      } catch (err) {
        progress.message = `${what}: ${stepFailure(err, { source: cfg.sourceHost, other: host }, cfg.destinationDeadlineSeconds).message} (trying again every 10 s)`;
        showDetails();
        log.warn(progress.message, { vmId: cfg.vmId, migrationId });
        await sleep('10 seconds');
      }
    }
  }

  /** After the commit there is no way back: a step that fails for good waits, says why, and is tried again. */
  async function rollForward<T>(what: string, host: string, fn: () => Promise<T>): Promise<T> {
    for (;;) {
      try {
        return await fn();
      } catch (err) {
        progress.message = `${what} waits: ${stepFailure(err, { source: cfg.sourceHost, other: host }, cfg.destinationDeadlineSeconds).message}. The VM runs on ${destination}; the step is tried again every 30 s`;
        showDetails();
        log.error(progress.message, { vmId: cfg.vmId, migrationId });
        await sleep(ROLL_FORWARD_RETRY);
      }
    }
  }

  /**
   * Before the commit `dest` failed: roll back from it. The report when the migration ends here
   * (`final`), null when the next destination is to be tried; throws when the source VM died.
   */
  async function failedAt(dest: string, reason: string, final: boolean): Promise<MigrationReport | null> {
    const rb = await rollBack(dest, reason, final);
    if (rb.state === 'crashed' || rb.state === 'stopped') throw crashed(rb, dest, reason);
    if (final) return finish('rolled-back', reason);
    report.failedDestinations.push({ host: dest, reason });
    await releaseHostSlots();
    return null;
  }

  /** The source VM's process died: after the rollback, the migration fails and says how the VM is left. */
  function crashed(rb: RollbackResult, dest: string | null, cause: string): SourceVmCrashed {
    const how = rb.exit ? ` (${describeExit(rb.exit)})` : '';
    const cleaned = dest ? `; destination ${dest} was fenced and its incoming VM removed` : '';
    return new SourceVmCrashed(
      `VM ${cfg.vmId} is ${rb.state} on ${cfg.sourceHost}${how}: its process ended during the migration (${cause})${cleaned}. Restarting it is your choice: ferry vm start ${cfg.vmId} --host ${cfg.sourceHost}`,
    );
  }

  try {
    for (const dest of cfg.destinationHosts) {
      destination = dest;
      progress.destinationHost = dest;
      report.destinationHost = dest;
      upsertSearchAttributes([{ key: SearchAttributes.destinationHost, value: dest }]);
      preCommitScope = new CancellationScope();
      if (abortReason !== null) preCommitScope.cancel(); // aborted while validating or between destinations
      let sw: SwitchoverResult | DestinationLost;
      try {
        sw = await preCommitScope.run(() => precopy(dest));
      } catch (err) {
        const failure = stepFailure(err, { source: cfg.sourceHost, other: dest }, cfg.destinationDeadlineSeconds);
        const reason = abortReason ?? failure.message;
        // Another destination cannot help when the source is the problem (its VM died, its image fails).
        const final = abortReason !== null || isCancellation(err) || failure.blame === 'source';
        const ended = await failedAt(dest, reason, final);
        if (ended) return ended;
        continue;
      }
      preCommitScope = null;
      if (sw.outcome === 'destination-lost') {
        await resumeAfterLoss(dest);
        const r = resolution!;
        const reason = `destination ${dest} was declared lost by ${r.by} at ${r.at} (${r.reason}) after the Final message left; ${cfg.vmId} runs on ${cfg.sourceHost} again and ${dest}'s copy of epoch ${epoch} is revoked`;
        report.failedDestinations.push({ host: dest, reason: `lost after the Final message left; declared lost by ${r.by}: ${r.reason}` });
        return finish('rolled-back', reason);
      }
      report.memoryBytesSent += sw.memoryBytes;
      report.diskBytesSent += sw.diskBytes;
      if (sw.outcome === 'aborted') {
        const final = abortReason !== null;
        const reason = abortReason ?? sw.reason;
        const ended = await failedAt(dest, reason, final);
        if (ended) return ended;
        continue;
      }
      committed = true;
      report.hypervisorDowntimeMs = sw.hypervisorDowntimeMs;
      report.memoryRounds = sw.memoryIterations;
      report.throttled ||= sw.throttled;
      track.staleBlocks = sw.staleBlocks;
      transferred();
      const dst = hostActivities(dest, cfg.destinationDeadlineSeconds);

      if (cfg.mode === 'tpm') {
        setPhase('postcopy', `VM runs on ${dest}; pushing ${sw.staleBlocks} stale blocks from ${cfg.sourceHost}`);
        stage('postcopy');
        const pc = await rollForward('the postcopy', cfg.sourceHost, () =>
          src.rollForward.postcopy.executeWithOptions({ ...src.options.rollForward, summary: `postcopy: ${sw.staleBlocks} stale blocks` }, [ref!]),
        );
        report.diskBytesSent += pc.bytes;
        transferred();
      }
      setPhase('finalizing', `releasing ${cfg.vmId} on ${cfg.sourceHost}`);
      stage('finalize');
      // Independent steps on two hosts: one round trip for both.
      const [done] = await Promise.all([
        rollForward('finishing on the destination', dest, () => dst.rollForward.finishDestination({ migrationId, vmId: cfg.vmId })),
        rollForward('releasing the source', cfg.sourceHost, () => src.rollForward.finalizeSource({ vmId: cfg.vmId, migrationId, blockBytes: cfg.blockBytes, startedAtMs: startedAt })),
      ]);
      report.downtimeMs = done.downtimeMs;
      report.onDemandFetches = done.fetches;
      report.postcopyMs = done.postcopyMs ?? 0;
      report.staleWaits = done.staleWaits;
      return finish('completed');
    }
    const rb = await rollBack(null, 'no destination left', true);
    const reason = `every destination failed: ${report.failedDestinations.map((f) => `${f.host}: ${f.reason}`).join('; ')}`;
    if (rb.state === 'crashed' || rb.state === 'stopped') throw crashed(rb, null, reason);
    return finish('rolled-back', reason);
  } catch (err) {
    if (!(err instanceof SourceVmCrashed)) throw err;
    setPhase('failed', err.message);
    upsertSearchAttributes([{ key: SearchAttributes.outcome, value: 'failed' }]);
    upsertMemo({ outcome: 'failed', reason: err.message });
    const details: StepFailure = { host: cfg.sourceHost, blame: 'source' };
    throw ApplicationFailure.create({ message: err.message, type: 'VmCrashed', nonRetryable: true, details: [details] });
  }

  /** Host slots go back before the next destination is tried, so that hosts are always taken in order. */
  function releaseHostSlots(): Promise<void> {
    return CancellationScope.nonCancellable(() => slots.release((scope) => scope !== CLUSTER_SCOPE));
  }

  async function finish(outcome: 'completed' | 'rolled-back', reason?: string): Promise<MigrationReport> {
    await CancellationScope.nonCancellable(() => slots.release());
    report.outcome = outcome;
    report.reason = reason;
    report.totalMs = workflowNow() - startedAt;
    if (outcome === 'rolled-back') report.destinationHost = null;
    if (outcome === 'completed') track.position = { stage: 'done', round: 0 };
    setPhase(outcome, outcome === 'completed' ? `VM ${cfg.vmId} runs on ${destination} (epoch ${epoch})` : `rolled back: ${reason}`);
    upsertSearchAttributes([{ key: SearchAttributes.outcome, value: outcome }]);
    upsertMemo({ outcome, reason: reason ?? null, downtimeMs: report.downtimeMs, totalMs: report.totalMs, destination: report.destinationHost });
    // An abort that stopped the stream may still wait for its activity's answer: it gets its reply.
    await condition(allHandlersFinished);
    return report;
  }
}

/** The deterministic time of the current workflow task (Temporal replays it from history). */
function workflowNow(): number {
  // eslint-disable-next-line no-restricted-properties -- inside a workflow Date.now is the task time, replay-safe
  return Date.now();
}

/** The switchover stopped for good: an operator declared the destination lost (ferry resolve). */
interface DestinationLost {
  outcome: 'destination-lost';
}

/**
 * What a failed step says and whose problem it is (the agents classify their errors: activities/failures.ts).
 * A step that timed out is named by the host it runs on: the source for source steps, else `other`.
 */
function stepFailure(err: unknown, hosts: { source: string; other: string }, deadlineSeconds: number): { message: string; blame: StepFailure['blame'] } {
  if (err instanceof ApplicationFailure) return { message: err.message, blame: (err.details?.[0] as StepFailure | undefined)?.blame ?? null };
  const e = err as { cause?: unknown; message?: string; activityType?: string };
  if (e?.cause instanceof TimeoutFailure) {
    const host = e.activityType !== undefined && SOURCE_STEPS.includes(e.activityType) ? hosts.source : hosts.other;
    return { message: `host ${host} did not answer on task queue ${hostTaskQueue(host)} within ${deadlineSeconds} s: is its agent running (ferry worker --host ${host})?`, blame: null };
  }
  if (e?.cause instanceof ApplicationFailure) return { message: e.cause.message, blame: (e.cause.details?.[0] as StepFailure | undefined)?.blame ?? null };
  const cause = e?.cause as { message?: string } | undefined;
  return { message: cause?.message ?? e?.message ?? String(err), blame: null };
}
