// FerryClient: the typed programmatic API over Temporal.
import { randomUUID } from 'node:crypto';
import os from 'node:os';
import { Client, ServiceError, TimeoutFailure, WorkflowFailedError, type WorkflowExecutionStatusName, type WorkflowHandle } from '@temporalio/client';
import { defaultPayloadConverter, TimeoutType } from '@temporalio/common';
import type { Activities } from '../activities';
import type { MigrateVmInput, MigrationPhase, MigrationProgress, MigrationReport, RetryState, StepFailure } from '../common/migration';
import { liveProgress, type PublishedProgress, type RunningTransfer, type StepProgress } from '../common/progress';
import { DEFAULT_TASK_QUEUE, hostName, hostOfIdentity, hostTaskQueue, migrationWorkflowId } from '../common/types';
import type { HostCommand } from '../workflows/host-command';
import {
  CLUSTER_SCOPE,
  SearchAttributes,
  abortUpdate,
  admissionStateQuery,
  admissionWorkflowId,
  approveCutoverUpdate,
  hostScope,
  progressQuery,
  resolveDestinationLostUpdate,
  setBandwidthSignal,
  type AdmissionState,
} from '../workflows/definitions';
import { bandwidthError } from '../workflows/validate';
import { FerryRequestError, HostNotAnswering, HostUnavailable, ValidationFailed, isDeadlineExceeded, toFerryError } from './errors';
import { setTimeout as sleep } from 'node:timers/promises';

// Earlier code imported the errors from this module.
export type { AdmissionState, SlotHolder, SlotRequest } from '../workflows/definitions';
export { FerryRequestError, HostNotAnswering, HostUnavailable, MigrationAlreadyRunning, MigrationNotFound, ValidationFailed, VmNotFound } from './errors';

/** temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY (not imported: @temporalio/proto is not a direct dependency). */
const TASK_QUEUE_TYPE_ACTIVITY = 2;
/** An agent that has just started may not have polled yet: look again for this long before refusing. */
const HOST_CHECK_GRACE_MS = 3000;
/** The workflow answers its progress query within milliseconds; past this, its agent is not answering. */
const QUERY_TIMEOUT_MS = 5000;

export interface MigrateOptions {
  /** Refuse with HostUnavailable when the source or a destination has no agent polling (default true). */
  checkHosts?: boolean;
}

export interface MigrationFilter {
  vmId?: string;
  sourceHost?: string;
  destinationHost?: string;
  phase?: MigrationPhase;
  outcome?: MigrationReport['outcome'];
  /** true: only running migrations; false: only ended ones. */
  running?: boolean;
  /** At most this many, newest first (default 100). */
  limit?: number;
}

/** One migration as Temporal visibility sees it (search attributes; eventually consistent). */
export interface MigrationSummary {
  vmId: string;
  workflowId: string;
  runId: string;
  /** Temporal's execution status: RUNNING, COMPLETED, FAILED, TERMINATED, ... */
  status: WorkflowExecutionStatusName;
  phase: MigrationPhase | null;
  mode: string | null;
  outcome: MigrationReport['outcome'] | null;
  sourceHost: string | null;
  /** The destination being tried, or the last one tried. */
  destinationHost: string | null;
  startTime: Date;
  closeTime: Date | null;
}

/** Where a migration stands: its progress while it runs, its report or its error once it has ended. */
export interface MigrationState {
  vmId: string;
  /** When this state was read (ISO 8601, this client's clock). */
  asOf: string;
  workflowId: string;
  runId: string;
  status: WorkflowExecutionStatusName;
  /** The phase as Temporal's visibility last recorded it (search attribute FerryPhase). */
  phase: MigrationPhase | null;
  /** null when the workflow cannot answer the query (it failed before registering it, or its agent does not answer). */
  progress: MigrationProgress | null;
  /** Why a running migration's progress is missing (the host that does not answer, say). */
  progressUnavailable: string | null;
  report: MigrationReport | null;
  error: { type: string | null; message: string; refused: boolean } | null;
}

export interface HostAgent {
  identity: string;
  lastAccessTime: Date | null;
}

export class MigrationHandle {
  constructor(
    readonly vmId: string,
    readonly workflow: WorkflowHandle,
  ) {}

  get workflowId(): string {
    return this.workflow.workflowId;
  }

  /**
   * The workflow's progress, completed with the last heartbeat of the transfer running right now
   * (the workflow itself learns its bytes only when it ends): percent, rate and ETA of the model in
   * common/progress.ts; and the step being retried, if one is, from Temporal's record of its last failure.
   */
  async progress(): Promise<MigrationProgress> {
    try {
      const describe = this.workflow.client.connection.withDeadline(Date.now() + QUERY_TIMEOUT_MS, () => this.workflow.describe());
      const [p, desc] = await Promise.all([this.published(), describe]);
      const pending = desc.raw.pendingActivities ?? [];
      const live = liveProgress(p, runningTransfer(pending), Date.now());
      live.retrying = pending.map(retryStateOf).find((r) => r !== null) ?? (pending.length > 0 ? p.retrying : null);
      return live;
    } catch (err) {
      throw toFerryError(err, { vmId: this.vmId });
    }
  }

  /** The workflow's answer to the progress query, within QUERY_TIMEOUT_MS (else HostNotAnswering). */
  private async published(): Promise<PublishedProgress> {
    const asked = Date.now();
    try {
      return await this.workflow.client.connection.withDeadline(Date.now() + QUERY_TIMEOUT_MS, () => this.workflow.query(progressQuery));
    } catch (err) {
      // Past the deadline a loaded server may answer with an error of its own ("Failed to query Workflow")
      // rather than DEADLINE_EXCEEDED: either way, nothing answered in time.
      if (!isDeadlineExceeded(err) && !(err instanceof ServiceError && Date.now() - asked >= QUERY_TIMEOUT_MS - 250)) throw err;
      // The server answers the history at once unless it is the one that is gone.
      const worker = await this.workflowWorker().catch(() => {
        throw err;
      });
      throw new HostNotAnswering(worker && hostOfIdentity(worker), worker, QUERY_TIMEOUT_MS);
    }
  }

  /** The worker that took the workflow's latest task: it holds the workflow, and answers its queries. */
  private async workflowWorker(): Promise<string | null> {
    const { client } = this.workflow;
    const res = await client.connection.withDeadline(Date.now() + QUERY_TIMEOUT_MS, () =>
      client.workflowService.getWorkflowExecutionHistoryReverse({
        namespace: client.options.namespace,
        execution: { workflowId: this.workflow.workflowId },
        maximumPageSize: 50,
      }),
    );
    for (const ev of res.history?.events ?? []) {
      const identity = ev.workflowTaskStartedEventAttributes?.identity;
      if (identity) return identity;
    }
    return null;
  }

  /** The report once the migration ends (completed or rolled back); rejects with a typed error if it failed. */
  async result(): Promise<MigrationReport> {
    try {
      return (await this.workflow.result()) as MigrationReport;
    } catch (err) {
      throw toFerryError(err, { vmId: this.vmId });
    }
  }

  /**
   * Resolves once the workflow has validated the input and found the VM running on the source (or
   * after `timeoutMs` of validating); rejects with the refusal (ValidationFailed, VmNotFound...).
   */
  async accepted(timeoutMs = 30_000): Promise<void> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const desc = await this.workflow.describe().catch((err: unknown) => {
        throw toFerryError(err, { vmId: this.vmId });
      });
      if (desc.status.name !== 'RUNNING') {
        await this.result();
        return;
      }
      const p = await this.published().catch(() => null);
      if ((p && p.phase !== 'validating') || Date.now() > until) return;
      await sleep(200);
    }
  }

  /** Progress, report or error, whichever applies now. */
  async state(): Promise<MigrationState> {
    const desc = await this.workflow.describe().catch((err: unknown) => {
      throw toFerryError(err, { vmId: this.vmId });
    });
    const state: MigrationState = {
      vmId: this.vmId,
      asOf: new Date().toISOString(),
      workflowId: desc.workflowId,
      runId: desc.runId,
      status: desc.status.name,
      phase: (desc.typedSearchAttributes.get(SearchAttributes.phase) as MigrationPhase | undefined) ?? null,
      progress: null,
      progressUnavailable: null,
      report: null,
      error: null,
    };
    if (desc.status.name === 'RUNNING') {
      state.progress = await this.progress().catch((err: unknown) => {
        state.progressUnavailable = (err as Error).message;
        return null;
      });
      return state;
    }
    const published = await this.published().catch(() => null);
    state.progress = published && liveProgress(published, null, Date.now());
    try {
      state.report = await this.result();
    } catch (err) {
      const e = err instanceof FerryRequestError ? err : null;
      state.error = { type: e?.type ?? null, message: (err as Error).message, refused: e?.refused ?? false };
    }
    return state;
  }

  /** Roll the migration back; refused (FerryRequestError type AbortRefused) past the commit point. */
  async abort(reason = 'aborted by operator'): Promise<{ accepted: true; phase: string }> {
    try {
      return await this.workflow.executeUpdate(abortUpdate, { args: [reason] });
    } catch (err) {
      throw toFerryError(err, { vmId: this.vmId, running: true, refusal: 'AbortRefused' });
    }
  }

  /** Let a `cutover: 'manual'` migration go to the switchover; refused (type ApproveRefused, with the reason) for any other. */
  async approveCutover(): Promise<{ accepted: true; phase: string }> {
    try {
      return await this.workflow.executeUpdate(approveCutoverUpdate);
    } catch (err) {
      throw toFerryError(err, { vmId: this.vmId, running: true, refusal: 'ApproveRefused' });
    }
  }

  /**
   * The operator's decision for a migration whose destination stopped answering after the Final
   * message left (the VM waits, paused, on the source): the destination is lost for good. The
   * workflow records who, when and why in its history, fences the lost host's epoch (its agent
   * destroys its copy if it ever returns) and resumes the VM on the source. Refused (type
   * ResolveRefused) unless the migration waits for exactly that.
   *
   * DANGER: use it only when the destination host is known to be powered off or fenced. If it still
   * runs, it may have committed and resumed the VM: there are then two running copies until its
   * agent reaches Temporal again and destroys its own.
   */
  async resolveDestinationLost(reason: string, by = operatorName()): Promise<{ accepted: true; host: string; epoch: number }> {
    try {
      return await this.workflow.executeUpdate(resolveDestinationLostUpdate, { args: [{ reason, by }] });
    } catch (err) {
      throw toFerryError(err, { vmId: this.vmId, running: true, refusal: 'ResolveRefused' });
    }
  }

  /** Change the data-plane limit while the migration runs; null = unlimited. */
  async setBandwidth(bytesPerSecond: number | null): Promise<void> {
    const invalid = bandwidthError(bytesPerSecond);
    if (invalid) throw new ValidationFailed(invalid);
    try {
      await this.workflow.signal(setBandwidthSignal, bytesPerSecond);
    } catch (err) {
      throw toFerryError(err, { vmId: this.vmId, running: true });
    }
  }
}

export interface FerryClientOptions {
  /** The task queue of the Ferry deployment's workflows, as its agents' --task-queue (default ferry-migrations). */
  taskQueue?: string;
}

export class FerryClient {
  readonly taskQueue: string;

  constructor(
    readonly temporal: Client,
    options: FerryClientOptions = {},
  ) {
    this.taskQueue = options.taskQueue ?? DEFAULT_TASK_QUEUE;
  }

  /**
   * Start a migration. Refuses at once with MigrationAlreadyRunning or HostUnavailable; the
   * workflow's own refusals (ValidationFailed, VmNotFound) come from the handle's accepted()/result().
   */
  async migrate(input: MigrateVmInput, options: MigrateOptions = {}): Promise<MigrationHandle> {
    if (options.checkHosts !== false) {
      const hosts = [input.sourceHost, ...(input.destinationHosts ?? [])].filter(isHostName);
      await Promise.all(hosts.map((h) => this.checkHost(h)));
    }
    try {
      const handle = await this.temporal.workflow.start('migrateVm', {
        taskQueue: this.taskQueue,
        workflowId: migrationWorkflowId(input.vmId),
        args: [input],
        // Shown as the Summary in the Web UI (the workflow keeps the Current Details up to date).
        staticSummary: `migrate ${input.vmId} from ${input.sourceHost} to ${(input.destinationHosts ?? []).join(' or ')} (${input.mode ?? 'tpm'})`,
        typedSearchAttributes: [
          { key: SearchAttributes.vmId, value: String(input.vmId) },
          { key: SearchAttributes.sourceHost, value: String(input.sourceHost) },
          { key: SearchAttributes.phase, value: 'validating' },
          { key: SearchAttributes.mode, value: input.mode ?? 'tpm' },
        ],
      });
      return new MigrationHandle(input.vmId, handle);
    } catch (err) {
      throw toFerryError(err, { vmId: input.vmId });
    }
  }

  /** The latest migration of a VM (running or ended); methods reject with MigrationNotFound if there is none. */
  getMigration(vmId: string): MigrationHandle {
    return new MigrationHandle(vmId, this.temporal.workflow.getHandle(migrationWorkflowId(vmId)));
  }

  /** Migrations from Temporal visibility, newest first. */
  async listMigrations(filter: MigrationFilter = {}): Promise<MigrationSummary[]> {
    const limit = filter.limit ?? 100;
    const out: MigrationSummary[] = [];
    for await (const wf of this.temporal.workflow.list({ query: migrationQuery(filter), pageSize: Math.min(limit, 1000) })) {
      const sa = wf.typedSearchAttributes;
      out.push({
        vmId: sa.get(SearchAttributes.vmId) ?? wf.workflowId.replace(/^migrate-/, ''),
        workflowId: wf.workflowId,
        runId: wf.runId,
        status: wf.status.name,
        phase: (sa.get(SearchAttributes.phase) as MigrationPhase | undefined) ?? null,
        mode: sa.get(SearchAttributes.mode) ?? null,
        outcome: (sa.get(SearchAttributes.outcome) as MigrationReport['outcome'] | undefined) ?? null,
        sourceHost: sa.get(SearchAttributes.sourceHost) ?? null,
        destinationHost: sa.get(SearchAttributes.destinationHost) ?? null,
        startTime: wf.startTime,
        closeTime: wf.closeTime ?? null,
      });
      if (out.length >= limit) break;
    }
    return out;
  }

  /** The agents polling a host's task queue (Temporal lists pollers seen in the last few minutes). */
  async hostAgents(host: string): Promise<HostAgent[]> {
    const res = await this.temporal.workflowService.describeTaskQueue({
      namespace: this.temporal.options.namespace,
      taskQueue: { name: hostTaskQueue(host) },
      taskQueueType: TASK_QUEUE_TYPE_ACTIVITY,
    });
    return (res.pollers ?? []).map((p) => ({
      identity: p.identity ?? '',
      lastAccessTime: p.lastAccessTime?.seconds != null ? new Date(Number(p.lastAccessTime.seconds) * 1000) : null,
    }));
  }

  /** Throws HostUnavailable unless an agent polls the host's task queue. */
  async checkHost(host: string): Promise<void> {
    const until = Date.now() + HOST_CHECK_GRACE_MS;
    while ((await this.hostAgents(host)).length === 0) {
      if (Date.now() > until) throw new HostUnavailable(host);
      await sleep(250);
    }
  }

  /**
   * Migration slots of a host, or of the whole cluster (host null): who holds one and who waits.
   * Null when no migration ever asked for a slot there.
   */
  async slots(host: string | null): Promise<AdmissionState | null> {
    const handle = this.temporal.workflow.getHandle(admissionWorkflowId(host === null ? CLUSTER_SCOPE : hostScope(host), this.taskQueue));
    try {
      return await handle.query(admissionStateQuery);
    } catch (err) {
      if ((err as Error).name === 'WorkflowNotFoundError') return null;
      throw toFerryError(err);
    }
  }

  /** Run one VM-administration command on a host through its agent. */
  async hostCommand<C extends HostCommand>(host: string, command: C, ...args: Parameters<Activities[C]>): Promise<Awaited<ReturnType<Activities[C]>>> {
    if (isHostName(host)) await this.checkHost(host);
    try {
      return (await this.temporal.workflow.execute('hostCommand', {
        taskQueue: this.taskQueue,
        workflowId: `host-${host}-${command}-${randomUUID()}`,
        args: [{ host, command, args }],
      })) as Awaited<ReturnType<Activities[C]>>;
    } catch (err) {
      if (err instanceof WorkflowFailedError && scheduleToStartTimeout(err)) throw new HostUnavailable(host);
      throw toFerryError(err);
    }
  }

  /** Close the Temporal connection (for clients made by connectFerry; a shared connection is closed by its owner). */
  async close(): Promise<void> {
    await this.temporal.connection.close();
  }
}

/** Who runs this program, for the record of an operator's decision. */
function operatorName(): string {
  let user = 'unknown';
  try {
    user = os.userInfo().username;
  } catch {
    // no passwd entry (a container): the host name still says where it came from
  }
  return `${user}@${os.hostname()}`;
}

/** A pending activity that has failed at least once: the agent's StepFailure (or Temporal's own record). */
function retryStateOf(act: { activityType?: { name?: string | null } | null; attempt?: number | null; lastFailure?: { message?: string | null; applicationFailureInfo?: { details?: { payloads?: unknown[] | null } | null } | null } | null; lastAttemptCompleteTime?: { seconds?: unknown } | null }): RetryState | null {
  const failure = act.lastFailure;
  if (!failure) return null;
  const payload = failure.applicationFailureInfo?.details?.payloads?.[0];
  const details = payload ? (defaultPayloadConverter.fromPayload(payload as never) as StepFailure | undefined) : undefined;
  if (details?.retry) return { ...details.retry, attempt: Math.max(details.retry.attempt, (act.attempt ?? 1) - 1) };
  const at = act.lastAttemptCompleteTime?.seconds;
  return {
    step: act.activityType?.name ?? 'a step',
    cause: failure.message ?? 'unknown error',
    attempt: Math.max(1, (act.attempt ?? 1) - 1),
    sinceMs: at != null ? Number(at) * 1000 : Date.now(),
  };
}

type PendingActivity = NonNullable<Awaited<ReturnType<WorkflowHandle['describe']>>['raw']['pendingActivities']>[number];

/** The transfer activity under way and its last heartbeat (one at a time: the workflow runs them in turn). */
function runningTransfer(pending: PendingActivity[]): RunningTransfer | null {
  for (const act of pending) {
    const payload = act.heartbeatDetails?.payloads?.[0];
    const heartbeat = payload ? ((defaultPayloadConverter.fromPayload(payload) as StepProgress | undefined) ?? null) : null;
    const activity = act.activityType?.name ?? '';
    if (heartbeat) return { activity, heartbeat };
  }
  return null;
}

function isHostName(h: string): boolean {
  try {
    hostName(h);
    return true;
  } catch {
    return false;
  }
}

function scheduleToStartTimeout(err: Error): boolean {
  for (let cur: unknown = err; cur instanceof Error; cur = cur.cause) {
    if (cur instanceof TimeoutFailure && cur.timeoutType === TimeoutType.SCHEDULE_TO_START) return true;
  }
  return false;
}

/**
 * A visibility query for the filter. Values are quoted as string literals (quote and backslash
 * escaped), so a VM id or host name can never change the query's structure.
 */
export function migrationQuery(filter: MigrationFilter): string {
  const clauses = [`WorkflowType = 'migrateVm'`];
  const eq = (attr: string, value: string | undefined) => {
    if (value !== undefined) clauses.push(`${attr} = ${quote(value)}`);
  };
  eq(SearchAttributes.vmId.name, filter.vmId);
  eq(SearchAttributes.sourceHost.name, filter.sourceHost);
  eq(SearchAttributes.destinationHost.name, filter.destinationHost);
  eq(SearchAttributes.phase.name, filter.phase);
  eq(SearchAttributes.outcome.name, filter.outcome);
  if (filter.running !== undefined) clauses.push(`ExecutionStatus ${filter.running ? '=' : '!='} 'Running'`);
  return clauses.join(' AND ');
}

function quote(value: string): string {
  // eslint-disable-next-line no-control-regex -- control characters are exactly what is refused
  if (/[\0-\x1f]/.test(value)) throw new FerryRequestError(`invalid filter value ${JSON.stringify(value)}: control characters are not allowed`, 'InvalidArgument');
  return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
}
