// FerryClient: the typed programmatic API over Temporal.
import { randomUUID } from 'node:crypto';
import { Client, WorkflowExecutionAlreadyStartedError, WorkflowFailedError, type WorkflowHandle } from '@temporalio/client';
import { defaultPayloadConverter } from '@temporalio/common';
import type { Activities } from '../activities';
import type { MigrateVmInput, MigrationProgress, MigrationReport } from '../common/migration';
import { MIGRATION_TASK_QUEUE, migrationWorkflowId } from '../common/types';
import type { HostCommand } from '../workflows/host-command';
import { SearchAttributes, abortUpdate, approveCutoverSignal, progressQuery, setBandwidthSignal } from '../workflows/definitions';

export class MigrationAlreadyRunning extends Error {
  constructor(readonly vmId: string) {
    super(`VM ${vmId} is already migrating (workflow ${migrationWorkflowId(vmId)}): wait for it (ferry status ${vmId}) or abort it (ferry abort ${vmId})`);
    this.name = 'MigrationAlreadyRunning';
  }
}

export class FerryRequestError extends Error {
  constructor(
    message: string,
    readonly type: string | undefined,
  ) {
    super(message);
    this.name = 'FerryRequestError';
  }
}

export class MigrationHandle {
  constructor(
    readonly vmId: string,
    readonly workflow: WorkflowHandle,
  ) {}

  /**
   * The workflow's progress, with the bytes of the transfer running right now added from its last
   * heartbeat (the workflow itself learns them only when the activity ends).
   */
  async progress(): Promise<MigrationProgress> {
    const [p, desc] = await Promise.all([this.workflow.query(progressQuery), this.workflow.describe()]);
    for (const act of desc.raw.pendingActivities ?? []) {
      const payload = act.heartbeatDetails?.payloads?.[0];
      if (!payload) continue;
      const details = defaultPayloadConverter.fromPayload(payload) as { bytes?: number } | undefined;
      const bytes = details?.bytes ?? 0;
      const kind = act.activityType?.name ?? '';
      if (kind === 'copyDiskFull' || kind === 'copyDiskDirty' || kind === 'postcopy') p.disk.sentBytes += bytes;
      if (kind === 'copyMemory') p.memory.sentBytes += bytes;
    }
    return p;
  }

  async result(): Promise<MigrationReport> {
    try {
      return (await this.workflow.result()) as MigrationReport;
    } catch (err) {
      throw unwrap(err);
    }
  }

  async abort(reason = 'aborted by operator'): Promise<void> {
    try {
      await this.workflow.executeUpdate(abortUpdate, { args: [reason] });
    } catch (err) {
      throw unwrap(err);
    }
  }

  approveCutover(): Promise<void> {
    return this.workflow.signal(approveCutoverSignal);
  }

  setBandwidth(bytesPerSecond: number | null): Promise<void> {
    return this.workflow.signal(setBandwidthSignal, bytesPerSecond);
  }
}

export class FerryClient {
  constructor(readonly temporal: Client) {}

  async migrate(input: MigrateVmInput): Promise<MigrationHandle> {
    try {
      const handle = await this.temporal.workflow.start('migrateVm', {
        taskQueue: MIGRATION_TASK_QUEUE,
        workflowId: migrationWorkflowId(input.vmId),
        args: [input],
        typedSearchAttributes: [
          { key: SearchAttributes.vmId, value: String(input.vmId) },
          { key: SearchAttributes.sourceHost, value: String(input.sourceHost) },
          { key: SearchAttributes.phase, value: 'validating' },
          { key: SearchAttributes.mode, value: input.mode ?? 'tpm' },
        ],
      });
      return new MigrationHandle(input.vmId, handle);
    } catch (err) {
      if (err instanceof WorkflowExecutionAlreadyStartedError) throw new MigrationAlreadyRunning(input.vmId);
      throw err;
    }
  }

  getMigration(vmId: string): MigrationHandle {
    return new MigrationHandle(vmId, this.temporal.workflow.getHandle(migrationWorkflowId(vmId)));
  }

  /** Run one VM-administration command on a host through its agent. */
  async hostCommand<C extends HostCommand>(host: string, command: C, ...args: Parameters<Activities[C]>): Promise<Awaited<ReturnType<Activities[C]>>> {
    try {
      return (await this.temporal.workflow.execute('hostCommand', {
        taskQueue: MIGRATION_TASK_QUEUE,
        workflowId: `host-${host}-${command}-${randomUUID()}`,
        args: [{ host, command, args }],
      })) as Awaited<ReturnType<Activities[C]>>;
    } catch (err) {
      throw unwrap(err);
    }
  }
}

/** Turn Temporal's nested failures into one error whose message is the root cause. */
function unwrap(err: unknown): Error {
  let cur = err as { cause?: unknown; message?: string; type?: string } | undefined;
  if (!(err instanceof WorkflowFailedError) && !(cur && 'cause' in cur)) return err as Error;
  let type: string | undefined;
  let message = cur?.message ?? String(err);
  while (cur?.cause) {
    cur = cur.cause as typeof cur;
    if (cur?.message) message = cur.message;
    if (cur?.type) type = cur.type;
  }
  return new FerryRequestError(message, type);
}
