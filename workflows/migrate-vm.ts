// migrateVm: the three-phase migration (precopy, freeze-and-copy, postcopy) of one VM, as a
// deterministic orchestration. Every step that touches a host is an activity on that host's queue.
import {
  ApplicationFailure,
  CancellationScope,
  ParentClosePolicy,
  TimeoutFailure,
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
import type { MigrationRef } from '../migration/source';
import { initialProgress, type MigrateVmInput, type MigrationPhase, type MigrationProgress, type MigrationReport } from '../common/migration';
import { PAGE_BYTES, hostTaskQueue } from '../common/types';
import { displayPercent, recentSamples, type ProgressStage, type ProgressTrack } from '../common/progress';
import { CLUSTER_SCOPE, SearchAttributes, abortUpdate, approveCutoverSignal, hostScope, progressQuery, setBandwidthSignal } from './definitions';
import { bandwidthError, validateInput } from './validate';
import { Slots } from './slots';
import { fenceDestination, fenceWorkflowId } from './fence-destination';

const GiB = 1024 ** 3;
/** Small VMs still get time for the orchestration itself. */
const MIN_COMPLETION_TIMEOUT_MS = 10 * 60_000;
/** At most this many disk+memory round pairs right before the freeze. */
const FINAL_ROUNDS = 4;
const PRE_COMMIT: MigrationPhase[] = ['validating', 'waiting-for-slot', 'preparing', 'disk-precopy', 'disk-dirty-rounds', 'memory-precopy', 'awaiting-cutover'];

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
  return {
    quick: proxyActivities<Activities>(quick),
    transfer: proxyActivities<Activities>(transfer),
    rollForward: proxyActivities<Activities>(rollForward),
    options: { quick, transfer, rollForward },
  };
}

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
    throttled: false,
    diskPrecopyResumedFromBlock: 0,
  };

  let preCommitScope: CancellationScope | null = null;

  setHandler(progressQuery, () => ({ ...progress, percent: track.floor, track }));
  setHandler(approveCutoverSignal, () => void (approved = true));
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
    (reason) => {
      abortReason = reason || 'aborted by operator';
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
    setCurrentDetails(`**${next}**: ${message}`);
    updatePercent();
    log.info(message, { phase: next, vmId: cfg.vmId, migrationId });
  }

  /** Percent, rate and ETA come from the progress model (common/progress.ts): the workflow keeps its track. */
  function updatePercent(stepDone = 0): void {
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
    } else {
      abortReason = `completion timeout of ${Math.round(timeoutMs / 1000)} s expired before the switchover`;
      preCommitScope?.cancel();
    }
  });

  /** Everything before the commit point, against one destination. Throws to roll back. */
  async function precopy(dest: string): Promise<void> {
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
      spec: { vmId: vm.vmId, diskBytes: vm.diskBytes, memoryBytes: vm.memoryBytes, workload: vm.workload, seed: vm.seed, opsPerSecond: vm.opsPerSecond },
      incremental: { policy: cfg.incremental, ...vm.incremental },
    });
    report.incremental = prepared.incremental;
    report.incrementalFallbackReason = prepared.reason;
    upsertSearchAttributes([{ key: SearchAttributes.incremental, value: prepared.incremental }]);
    upsertMemo({ incremental: prepared.incremental, incrementalFallbackReason: prepared.reason ?? null });
    if (prepared.reason) log.info(`full copy: ${prepared.reason}`, { vmId: cfg.vmId, migrationId });
    ref = {
      migrationId,
      vmId: cfg.vmId,
      epoch,
      destinationAddress: prepared.dataAddress,
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
      report.diskRounds = round;
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

    setPhase('memory-precopy', `copying the memory of ${cfg.vmId}`);
    stage('memory');
    const memFull = await src.transfer.copyMemory.executeWithOptions({ ...src.options.transfer, summary: 'memory precopy: full pass' }, [{ ref, full: true }]);
    report.memoryBytesSent += memFull.bytes;
    transferred();
    const memRate = memFull.durationMs > 0 ? memFull.bytes / memFull.durationMs : Infinity; // bytes per ms
    for (let round = 1; round <= 10 && !forceSwitchover; round++) {
      stage('converging', ++convergingRound);
      const r = await src.transfer.copyMemory.executeWithOptions({ ...src.options.transfer, summary: `memory precopy round ${round}` }, [{ ref, full: false }]);
      report.memoryRounds = round;
      report.memoryBytesSent += r.bytes;
      progress.memory.dirtyPages = r.items;
      progress.memory.remainingBytes = r.items * PAGE_BYTES;
      transferred();
      // The next round's dirty set is about this one's: stop once it fits in half the downtime target.
      if ((r.items * PAGE_BYTES) / memRate <= cfg.downtimeTargetMs / 2) break;
    }

    while (!approved && !forceSwitchover) {
      setPhase('awaiting-cutover', `converged; waiting for approval to switch over to ${dest} (ferry approve ${cfg.vmId})`);
      await condition(() => approved || forceSwitchover, '5 seconds');
      if (!approved && !forceSwitchover) {
        stage('converging', ++convergingRound);
        const r = await src.transfer.copyDiskDirty.executeWithOptions({ ...src.options.transfer, summary: 'disk round while awaiting cutover' }, [ref]);
        report.diskBytesSent += r.bytes;
        transferred();
        const m = await src.transfer.copyMemory.executeWithOptions({ ...src.options.transfer, summary: 'memory round while awaiting cutover' }, [{ ref, full: false }]);
        report.memoryBytesSent += m.bytes;
        transferred();
      }
    }
    // Disk and memory rounds in turn right before the freeze: what the memory precopy let pile up on the
    // disk goes first, each pair is shorter than the last, and the freeze carries as little as possible.
    let lastDiskItems = Infinity;
    for (let round = 1; round <= FINAL_ROUNDS; round++) {
      stage('converging', ++convergingRound);
      const d = await src.transfer.copyDiskDirty.executeWithOptions({ ...src.options.transfer, summary: `disk: round ${round} before the freeze` }, [ref]);
      report.diskBytesSent += d.bytes;
      transferred();
      const m = await src.transfer.copyMemory.executeWithOptions({ ...src.options.transfer, summary: `memory: round ${round} before the freeze` }, [{ ref, full: false }]);
      report.memoryBytesSent += m.bytes;
      transferred();
      const memoryFits = (m.items * PAGE_BYTES) / memRate <= cfg.downtimeTargetMs / 2;
      // In tpm mode stale blocks go to the postcopy, not into the freeze: once the disk set stops
      // halving, more rounds only send the same blocks again.
      const diskDone = d.items <= cfg.convergence.dirtyBlockThreshold || (cfg.mode === 'tpm' && d.items > lastDiskItems / 2);
      if (forceSwitchover || (memoryFits && diskDone)) break;
      lastDiskItems = d.items;
      if (!memoryFits && cfg.convergence.onStall === 'throttle' && throttle < 0.8) {
        // The guest dirties memory faster than a round moves it: hold it back (auto-converge) to meet the downtime target.
        throttle = Math.min(0.8, throttle + 0.2);
        report.throttled = true;
        await src.quick.setThrottle({ migrationId, vmId: cfg.vmId, fraction: throttle });
      }
    }
  }

  /**
   * The freeze-and-copy. It never gives up (it can only learn the outcome from the destination), but
   * while the destination cannot be reached the workflow says so, instead of only retrying.
   */
  async function switchover(dest: string) {
    const options: ActivityOptions = {
      ...src.options.rollForward,
      retry: { ...src.options.rollForward.retry, nonRetryableErrorTypes: ['DestinationUnreachable'] },
      summary: `switchover to ${dest}`,
    };
    for (;;) {
      try {
        return await src.rollForward.switchover.executeWithOptions(options, [{ ref: ref!, mode: cfg.mode }]);
      } catch (err) {
        const cause = (err as { cause?: unknown }).cause;
        if (!(cause instanceof ApplicationFailure && cause.type === 'DestinationUnreachable')) throw err;
        progress.message = `waiting for destination ${dest} to answer (switchover of epoch ${epoch}): ${cause.message}`;
        setCurrentDetails(progress.message);
        log.warn(progress.message, { vmId: cfg.vmId, migrationId });
        await sleep('10 seconds');
      }
    }
  }

  /** `final`: the migration ends rolled back (no other destination will be tried). */
  async function rollBack(dest: string | null, reason: string, final: boolean): Promise<void> {
    setPhase('rolling-back', `rolling back: ${reason}`);
    await CancellationScope.nonCancellable(async () => {
      if (dest) {
        const dst = hostActivities(dest, cfg.destinationDeadlineSeconds);
        // Fence first: the source resumes only once the destination can never run this epoch.
        await dst.quick.abortDestination({ migrationId, vmId: cfg.vmId, epoch }).catch(async (err) => {
          log.warn('could not reach the destination to fence it: the fence goes on in the background until it answers', { dest, err: String(err) });
          await startChild(fenceDestination, {
            workflowId: fenceWorkflowId(migrationId, dest),
            args: [{ host: dest, migrationId, vmId: cfg.vmId, epoch }],
            parentClosePolicy: ParentClosePolicy.ABANDON,
          });
        });
      }
      for (;;) {
        try {
          await src.quick.rollbackSource({ ref, vmId: cfg.vmId, migrationId, final, startedAtMs: startedAt });
          return;
        } catch (err) {
          // A paused source with an unreachable destination must wait: resuming could make two copies.
          progress.message = `VM ${cfg.vmId} is paused on ${cfg.sourceHost}; waiting for destination ${dest} to confirm the abort: ${String(err)}`;
          setCurrentDetails(progress.message);
          await sleep('10 seconds');
        }
      }
    });
  }

  for (const dest of cfg.destinationHosts) {
    destination = dest;
    progress.destinationHost = dest;
    report.destinationHost = dest;
    upsertSearchAttributes([{ key: SearchAttributes.destinationHost, value: dest }]);
    preCommitScope = new CancellationScope();
    if (abortReason !== null) preCommitScope.cancel(); // aborted while validating or between destinations
    try {
      await preCommitScope.run(() => precopy(dest));
    } catch (err) {
      const reason = abortReason ?? failureMessage(err, dest, cfg.destinationDeadlineSeconds);
      const final = abortReason !== null || isCancellation(err);
      await rollBack(dest, reason, final);
      if (final) return finish('rolled-back', reason);
      report.failedDestinations.push({ host: dest, reason });
      await releaseHostSlots();
      continue;
    }
    preCommitScope = null;

    setPhase('switchover', `freeze-and-copy to ${dest}`);
    stage('switchover');
    const sw = await CancellationScope.nonCancellable(() => switchover(dest));
    if (sw.outcome === 'aborted') {
      await rollBack(dest, sw.reason, false);
      report.failedDestinations.push({ host: dest, reason: sw.reason });
      await releaseHostSlots();
      continue;
    }
    committed = true;
    report.memoryBytesSent += sw.memoryBytes;
    report.diskBytesSent += sw.diskBytes;
    track.staleBlocks = sw.staleBlocks;
    transferred();
    const dst = hostActivities(dest, cfg.destinationDeadlineSeconds);

    if (cfg.mode === 'tpm') {
      setPhase('postcopy', `VM runs on ${dest}; pushing ${sw.staleBlocks} stale blocks from ${cfg.sourceHost}`);
      stage('postcopy');
      const pc = await src.rollForward.postcopy.executeWithOptions({ ...src.options.rollForward, summary: `postcopy: ${sw.staleBlocks} stale blocks` }, [ref!]);
      report.postcopyMs = pc.durationMs;
      report.diskBytesSent += pc.bytes;
      transferred();
    }
    setPhase('finalizing', `releasing ${cfg.vmId} on ${cfg.sourceHost}`);
    stage('finalize');
    // Independent steps on two hosts: one round trip for both.
    const [done] = await Promise.all([
      dst.rollForward.finishDestination({ migrationId, vmId: cfg.vmId }),
      src.rollForward.finalizeSource({ vmId: cfg.vmId, migrationId, blockBytes: cfg.blockBytes, startedAtMs: startedAt }),
    ]);
    report.downtimeMs = done.downtimeMs;
    report.onDemandFetches = done.fetches;
    return finish('completed');
  }
  await rollBack(null, 'no destination left', true);
  return finish('rolled-back', `every destination failed: ${report.failedDestinations.map((f) => `${f.host}: ${f.reason}`).join('; ')}`);

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
    return report;
  }
}

/** The deterministic time of the current workflow task (Temporal replays it from history). */
function workflowNow(): number {
  // eslint-disable-next-line no-restricted-properties -- inside a workflow Date.now is the task time, replay-safe
  return Date.now();
}

function failureMessage(err: unknown, host: string, deadlineSeconds: number): string {
  if (err instanceof ApplicationFailure) return err.message;
  const e = err as { cause?: unknown; message?: string };
  if (e?.cause instanceof TimeoutFailure) {
    return `host ${host} did not answer on task queue ${hostTaskQueue(host)} within ${deadlineSeconds} s: is its agent running (ferry worker --host ${host})?`;
  }
  const cause = e?.cause as { message?: string } | undefined;
  return cause?.message ?? e?.message ?? String(err);
}
