// What a host agent puts right at start and then periodically, against Temporal: no orphans.
//   - An incoming shell whose migration workflow closed without a commit (terminated from the Web UI,
//     say) is fenced and removed.
//   - A copy of a migration whose destination an operator declared lost (ferry resolve) is
//     destroyed, committed or not, before anything here could resume it.
//   - Incoming migrations a previous agent process left are reopened, and a committed VM among them
//     is resumed (roll forward).
//   - Source-side leftovers of a migration whose workflow closed (its stream, tracking, throttle) go.
//   - Temp files of atomic writes that a crash cut short are removed.
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import type { Logger } from '../common/log';
import { sweepTempFiles } from '../common/durable-file';
import { migrationWorkflowId } from '../common/types';
import type { Destination, IncomingRecord } from '../migration/destination';
import type { Source } from '../migration/source';
import { revokeWorkflowId } from '../workflows/fence-destination';

/** An atomic write takes milliseconds: a temp file this old was left by a crash. */
const TEMP_FILE_AGE_MS = 30_000;

export interface ReconcileDeps {
  host: string;
  home: string;
  client: Client;
  destination: Destination;
  source: Source;
  log: Logger;
}

type RunState = 'running' | 'closed' | 'unknown';

export class Reconciler {
  /**
   * Incoming migrations a previous agent process left (null until the first pass listed them): each
   * is reopened once, as soon as Temporal says its fate. Shells this process prepares it opens itself.
   */
  private leftBehind: Set<string> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private pass: Promise<void> | null = null;

  constructor(private readonly deps: ReconcileDeps) {}

  /** One pass now; then one every `intervalMs` until stop(). */
  async start(intervalMs: number): Promise<void> {
    await this.runOnce();
    this.timer = setInterval(() => void this.runOnce(), intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.pass;
  }

  /** One reconciliation pass (passes never overlap). */
  runOnce(): Promise<void> {
    this.pass ??= this.reconcile()
      .catch((err: unknown) => this.deps.log.warn({ err: String(err) }, 'reconciliation pass failed; the next one tries again'))
      .finally(() => (this.pass = null));
    return this.pass;
  }

  private async reconcile(): Promise<void> {
    const { destination, source, log } = this.deps;
    const removed = await sweepTempFiles(this.deps.home, TEMP_FILE_AGE_MS);
    if (removed.length > 0) log.info({ files: removed }, 'removed temp files of atomic writes a crash cut short');

    const records = await destination.records();
    this.leftBehind ??= new Set(records.map((r) => r.record.migrationId));
    for (const { record, committed } of records) {
      const ids = { migrationId: record.migrationId, vmId: record.vmId, epoch: record.epoch };
      if (await this.revoked(record)) {
        await destination.revoke(record.migrationId, record.vmId, record.epoch);
        continue;
      }
      const state = await this.runState(record.migrationId, record.vmId);
      if (state === 'unknown') continue;
      if (!committed && state === 'closed') {
        log.warn(ids, 'incoming shell of a migration whose workflow closed without a commit: fencing and removing it');
        await destination.abort(record.migrationId, record.vmId, record.epoch);
      } else if (this.leftBehind.delete(record.migrationId)) {
        await destination.recoverIncoming(record.migrationId).catch((err: unknown) => log.warn({ ...ids, err: String(err) }, 'could not reopen incoming migration'));
      }
    }

    for (const { migrationId, vmId } of source.activeMigrations()) {
      if ((await this.runState(migrationId, vmId)) !== 'closed') continue;
      log.warn({ migrationId, vmId }, 'migration workflow closed without telling this source: stopping its stream, tracking and throttle');
      await source.forget(migrationId);
    }
  }

  /** Whether an operator declared this host lost for the migration (its revokeDestination workflow exists). */
  private async revoked(record: IncomingRecord): Promise<boolean> {
    try {
      await this.deps.client.workflow.getHandle(revokeWorkflowId(record.migrationId, this.deps.host)).describe();
      return true;
    } catch (err) {
      if (err instanceof WorkflowNotFoundError) return false;
      throw err;
    }
  }

  /** The migration workflow's run named by a migration id (`migrate-<vm>-<runId>`). */
  private async runState(migrationId: string, vmId: string): Promise<RunState> {
    const workflowId = migrationWorkflowId(vmId);
    if (!migrationId.startsWith(`${workflowId}-`)) return 'unknown';
    try {
      const d = await this.deps.client.workflow.getHandle(workflowId, migrationId.slice(workflowId.length + 1)).describe();
      return d.status.name === 'RUNNING' ? 'running' : 'closed';
    } catch (err) {
      if (err instanceof WorkflowNotFoundError) return 'closed';
      throw err;
    }
  }
}
