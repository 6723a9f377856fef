// One cell of the matrix: a real migration of a small VM under a writing workload, one fault injected
// at one point, then every check of checks.ts, then the cluster put back as it was for the next cell.
import { WorkflowNotFoundError } from '@temporalio/client';
import type { MigrationHandle } from '../client/ferry-client';
import type { MigrationReport } from '../common/migration';
import type { VmSpec } from '../hypervisor/driver';
import { vmId as asVmId } from '../common/types';
import { CHAOS_VM, type ChaosEnv } from './env';
import { fault, unsupported, type FaultName } from './faults';
import { AFTER_COMMIT, PointMissed, clearFaultPoints, point, type PointName } from './points';
import { guestWorking } from '../harness/guest-working';
import { checkGuest, leftovers, violationsOnly, vmCopies, type GuestCheck } from './checks';

export type Outcome = 'completed' | 'rolled-back' | 'waiting' | 'hung' | 'failed' | 'missed' | 'n/a';

export interface CellResult {
  fault: FaultName;
  point: PointName;
  seed: number;
  outcome: Outcome;
  /** Rollback reason, what a waiting migration waits for, or the error. */
  detail: string | null;
  injected: string | null;
  violations: number | null;
  hashesEqual: boolean | null;
  /** VM processes of the VM across all hosts, and how many of them run the guest. */
  vmProcesses: number;
  runningCopies: number;
  /** Where the one VM process should be (the workflow's answer) and where it is. */
  expectedHost: string | null;
  hosts: string[];
  durationMs: number;
  /** Failed checks; empty when the cell passed. */
  problems: string[];
  ok: boolean;
}

export interface CellOptions {
  /** How long a migration may take after the injection before it counts as waiting (or hung). */
  settleTimeoutMs?: number;
  vm?: Partial<VmSpec>;
  /** Distinguishes VM ids of runs that share a Temporal server. */
  tag?: string;
  /** The migration's destination deadline (s): how long a lost destination holds the precopy. */
  destinationDeadlineSeconds?: number;
}

/** Cells the design does not define (after the commit the VM runs on the destination, so losing it loses the VM), or that this environment cannot inject. */
export function applicable(f: FaultName, p: PointName, env?: ChaosEnv): string | null {
  if (f === 'lose-dest' && AFTER_COMMIT.includes(p)) return 'after the commit the VM runs only on the destination: losing that host loses the VM';
  return env ? unsupported(f, env) : null;
}

/** What the design promises for a cell. */
export function expectedOutcomes(f: FaultName, p: PointName): Outcome[] {
  if (AFTER_COMMIT.includes(p)) return ['completed'];
  // Only once the Final message may have left does the source have to wait for the destination's answer.
  if (f === 'lose-dest') return p === 'after-prepared' ? ['waiting'] : ['rolled-back'];
  // A data plane cut for longer than the deadline before the commit: the destination is lost to this migration.
  if (f === 'partition-dataplane') return ['rolled-back'];
  return ['completed', 'rolled-back'];
}

export async function runCell(env: ChaosEnv, f: FaultName, p: PointName, seed: number, opts: CellOptions = {}): Promise<CellResult> {
  const [source, dest] = env.hosts;
  const result: CellResult = {
    fault: f, point: p, seed, outcome: 'n/a', detail: null, injected: null, violations: null, hashesEqual: null,
    vmProcesses: 0, runningCopies: 0, expectedHost: null, hosts: [], durationMs: 0, problems: [], ok: true,
  };
  const na = applicable(f, p, env);
  if (na) return { ...result, detail: na };

  const spec: VmSpec = {
    vmId: asVmId(`chaos-${opts.tag ?? 'x'}-${f}-${p}-${seed}`),
    ...CHAOS_VM[env.hypervisor],
    workload: 'mixed',
    seed,
    opsPerSecond: 400,
    fill: true,
    ...opts.vm,
  };
  const flt = fault(f);
  const pt = point(p);
  const deadlineSeconds = opts.destinationDeadlineSeconds ?? 20;
  await clearFaultPoints(env.faultDir);
  await env.ferry.hostCommand(source, 'vmCreate', spec);
  const started = Date.now();
  let handle: MigrationHandle | null = null;
  const stop = new AbortController();
  const timer = setTimeout(() => stop.abort(), 180_000);
  try {
    await guestWorking(env.ferry, source, spec.vmId);
    await pt.arm({ faultDir: env.faultDir });
    handle = await env.ferry.migrate({
      vmId: spec.vmId,
      sourceHost: source,
      destinationHosts: [dest],
      bandwidthBytesPerSecond: pt.bandwidth,
      convergence: { maxRounds: 2, onStall: 'switchover' },
      destinationDeadlineSeconds: deadlineSeconds,
    });
    const ctx = { env, source, dest, handle, afterCommit: AFTER_COMMIT.includes(p), deadlineSeconds };
    const pctx = { handle, faultDir: env.faultDir, signal: stop.signal };
    try {
      await pt.reach(pctx);
    } catch (err) {
      if (!(err instanceof PointMissed)) throw err;
      result.outcome = 'missed';
      result.detail = err.message;
    }
    if (result.outcome !== 'missed') {
      result.injected = await flt.inject(ctx);
      await pt.release(pctx);
      const settled = await flt.settle(ctx, stop.signal);
      if (settled.note) result.detail = settled.note;
      if (settled.problem) result.problems.push(settled.problem);
      await settle(result, handle, opts.settleTimeoutMs ?? 120_000);
      if (settled.note && result.detail !== settled.note) result.detail = `${result.detail}; ${settled.note}`;
    }
    result.durationMs = Date.now() - started;
    await check(env, result, handle, spec);
  } catch (err) {
    result.outcome = result.outcome === 'n/a' ? 'failed' : result.outcome;
    result.problems.push(`harness: ${(err as Error).message}`);
    result.durationMs ||= Date.now() - started;
  } finally {
    clearTimeout(timer);
    await restore(env, spec.vmId, handle).catch((err) => result.problems.push(`cleanup: ${(err as Error).message}`));
  }
  if (!expectedOutcomes(f, p).includes(result.outcome)) result.problems.push(`outcome ${result.outcome}, expected ${expectedOutcomes(f, p).join(' or ')}`);
  result.ok = result.problems.length === 0;
  return result;
}

async function settle(result: CellResult, handle: MigrationHandle, timeoutMs: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), timeoutMs)));
  const report = await Promise.race([handle.result().catch((err: Error) => err), timeout]);
  clearTimeout(timer);
  if (report instanceof Error) {
    result.outcome = 'failed';
    result.detail = report.message;
  } else if (report) {
    result.outcome = (report as MigrationReport).outcome;
    result.detail = (report as MigrationReport).reason ?? result.detail;
  } else {
    const progress = await handle.progress().catch(() => null);
    const message = progress?.message ?? 'no progress';
    // Waiting is a clear state only when the workflow says what it waits for.
    result.outcome = /waiting/i.test(message) ? 'waiting' : 'hung';
    result.detail = `${progress?.phase ?? '?'}: ${message}`;
  }
}

async function check(env: ChaosEnv, result: CellResult, handle: MigrationHandle, spec: VmSpec): Promise<void> {
  const [source, dest] = env.hosts;
  const copies = await vmCopies(env, spec.vmId);
  result.vmProcesses = copies.length;
  result.runningCopies = copies.filter((c) => c.state === 'running').length;
  result.hosts = copies.map((c) => `${c.host}:${c.state}`);
  const progress = await handle.progress().catch(() => null);
  const ended = result.outcome === 'completed' || result.outcome === 'rolled-back';
  result.expectedHost =
    result.outcome === 'completed' ? dest : result.outcome === 'rolled-back' ? source : progress && ['postcopy', 'finalizing'].includes(progress.phase) ? dest : source;
  if (copies.length !== 1 || copies[0].host !== result.expectedHost) {
    result.problems.push(`expected one VM process on ${result.expectedHost}, found ${copies.length} (${result.hosts.join(', ') || 'none'})`);
  }
  if (result.runningCopies > 1) result.problems.push(`${result.runningCopies} running copies`);
  if (ended && result.runningCopies !== 1) result.problems.push(`the VM does not run after the migration ended (${result.hosts.join(', ')})`);
  if (result.outcome === 'rolled-back' && !result.detail) result.problems.push('rolled back without a reason');

  let guest: GuestCheck | null = null;
  if (copies.length === 1) {
    guest = ended ? await checkGuest(env, copies[0].host, spec) : await violationsOnly(env, copies[0].host, spec.vmId).catch(() => null);
  }
  result.violations = guest?.violations ?? null;
  result.hashesEqual = guest?.hashesEqual ?? null;
  if (guest && guest.violations !== 0) result.problems.push(`${guest.violations} stale reads`);
  if (ended && guest?.hashesEqual !== true) result.problems.push('final hashes differ from the reference run');

  if (ended) {
    const pids = copies.map((c) => c.pid);
    result.problems.push(...(await leftovers(env, { vmId: spec.vmId, host: result.expectedHost! }, pids)));
  }
}

/** Put the cluster back: no workflow, no VM, no base of this cell; both agents up (a lost host re-provisioned empty). */
async function restore(env: ChaosEnv, vmId: string, handle: MigrationHandle | null): Promise<void> {
  if (handle) await handle.workflow.terminate('chaos cell over').catch((err) => {
    if (!(err instanceof WorkflowNotFoundError) && !/already completed|not found/i.test(String(err))) throw err;
  });
  for (const host of env.hosts) {
    if (!env.cluster.agents.has(host)) await env.cluster.startAgent(host);
  }
  await clearFaultPoints(env.faultDir);
  for (const host of env.hosts) {
    const vms = await env.ferry.hostCommand(host, 'vmList');
    if (vms.some((v) => v.vmId === vmId)) await env.ferry.hostCommand(host, 'vmDestroy', { vmId });
    const bases = await env.ferry.hostCommand(host, 'baseList');
    if (bases.some((b) => b.vmId === vmId)) await env.ferry.hostCommand(host, 'baseDelete', { vmId });
  }
}
