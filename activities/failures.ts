// The error taxonomy of host steps, in one place: every error an activity meets is classified here,
// at the activity boundary, as
//   transient  (a connection refused or reset, a timeout, an agent restarting): retried with backoff,
//              bounded by the workflow's deadlines;
//   permanent  (a full or read-only filesystem, no permission, an I/O error, the VM process gone, a
//              refusal by the hypervisor or the peer): a non-retryable failure whose message names
//              the host, the cause and the fix;
//   unknown    retried a few times, then treated as permanent.
// Every failure carries a StepFailure in its details: whose problem it is (the workflow tries the
// next destination only when it is the destination's) and, while it is retried, since when.
import { ApplicationFailure, CancelledFailure, Context } from '@temporalio/activity';
import type { ActivityInterceptorsFactory } from '@temporalio/worker';
import { DataPlaneError } from '../dataplane/api';
import { HypervisorError } from '../hypervisor/errors';
import { OwnershipConflict } from '../migration/ownership';
import { IncrementalUnavailable, InsufficientSpace } from '../migration/destination';
import { DestinationUnreachable, FenceUnconfirmed, VmGone } from '../migration/source';
import { BaseInUse } from '../migration/bases';
import { DESTINATION_STEPS, SOURCE_STEPS, formatRetry, type RetryState, type StepFailure } from '../common/migration';
import type { Logger } from '../common/log';
import { stepRetryingSignal } from '../workflows/definitions';

/** Attempts an error Ferry does not know gets before it counts as permanent. */
export const UNKNOWN_ERROR_ATTEMPTS = 5;

export type FailureKind = 'transient' | 'permanent' | 'unknown';

export interface Classified {
  kind: FailureKind;
  /** The ApplicationFailure type. */
  type: string;
  message: string;
  blame: StepFailure['blame'];
}

/** Where an activity runs and whom it serves: the host, its role, and the peer it talks to. */
export interface StepContext {
  host: string;
  role: 'source' | 'destination' | null;
  /** The destination host of a source step (its data-plane errors are that host's). */
  peer: string | null;
}

/** Filesystem and system errors no retry can heal, with what to do about them. */
const PERMANENT_ERRNO: Record<string, { what: string; fix: string }> = {
  ENOSPC: { what: 'no space left on the filesystem', fix: 'free space there' },
  EDQUOT: { what: 'the disk quota is exhausted', fix: 'raise the quota or free space there' },
  EROFS: { what: 'the filesystem is read-only', fix: 'remount it read-write' },
  EACCES: { what: 'permission denied', fix: "give the agent's user access to its --home" },
  EPERM: { what: 'operation not permitted', fix: "give the agent's user access to its --home" },
  EIO: { what: 'an I/O error on the storage', fix: 'check the disk and its kernel log' },
};
const TRANSIENT_ERRNO = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'EAGAIN', 'EBUSY']);

const TRANSIENT_DATAPLANE = new Set(['connect_failed', 'disconnected', 'timeout', 'closed', 'bad_checksum', 'corrupt_frame']);
const PERMANENT_HYPERVISOR = new Set(['VmNotFound', 'VmNotRunning', 'VmExists', 'InvalidArgument', 'InvalidState', 'CommandNotFound', 'BitmapNotFound', 'BitmapExists', 'AttachmentTooLarge', 'LineTooLong', 'ParseError']);
const TRANSIENT_HYPERVISOR = new Set(['Timeout', 'ConnectionClosed', 'MigrationFailed']);

function errnoOf(err: unknown): string | null {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  if (typeof code === 'string' && /^E[A-Z]+$/.test(code)) return code;
  // An error a peer sent back carries only its message: the code is a word in it (`ENOSPC: no space...`).
  const m = /\b(E[A-Z]{2,})\b/.exec((err as Error | null)?.message ?? '');
  return m && (m[1] in PERMANENT_ERRNO || TRANSIENT_ERRNO.has(m[1])) ? m[1] : null;
}

function errnoFailure(code: string, message: string, host: string, blame: StepFailure['blame']): Classified | null {
  const known = PERMANENT_ERRNO[code];
  if (known) {
    const elsewhere = blame === 'destination' ? ', or migrate to another destination' : '';
    return { kind: 'permanent', type: code, blame, message: `host ${host}: ${known.what} (${message}): ${known.fix}${elsewhere}` };
  }
  return TRANSIENT_ERRNO.has(code) ? { kind: 'transient', type: code, blame, message } : null;
}

/** The classification of one error met by a step (pure: the interceptor below applies it). */
export function classify(err: unknown, ctx: StepContext): Classified {
  const message = err instanceof Error ? err.message : String(err);
  const own = ctx.role;
  const peer = ctx.peer ?? 'the destination';
  if (err instanceof VmGone) return { kind: 'permanent', type: 'VmCrashed', blame: 'source', message };
  if (err instanceof FenceUnconfirmed) return { kind: 'transient', type: 'FenceUnconfirmed', blame: 'destination', message };
  if (err instanceof DestinationUnreachable) return { kind: 'transient', type: 'DestinationUnreachable', blame: 'destination', message };
  if (err instanceof OwnershipConflict) return { kind: 'permanent', type: 'OwnershipConflict', blame: own, message };
  if (err instanceof InsufficientSpace) return { kind: 'permanent', type: 'InsufficientSpace', blame: 'destination', message };
  if (err instanceof IncrementalUnavailable) return { kind: 'permanent', type: 'IncrementalUnavailable', blame: 'destination', message };
  if (err instanceof BaseInUse) return { kind: 'permanent', type: 'BaseInUse', blame: own, message };
  if (err instanceof DataPlaneError) {
    if (err.code === 'auth_failed') {
      return {
        kind: 'permanent',
        type: 'DataPlaneAuthFailed',
        blame: 'destination',
        message: `hosts ${ctx.host} and ${peer} do not share the data-plane secret (${message}): give every agent the same --data-secret-file and restart ${peer}'s agent`,
      };
    }
    if (err.code === 'remote') {
      const code = errnoOf(err);
      const classified = code ? errnoFailure(code, message, peer, 'destination') : null;
      return classified ?? { kind: 'unknown', type: 'DestinationError', blame: 'destination', message: `${peer} could not apply the migration's data: ${message}` };
    }
    if (TRANSIENT_DATAPLANE.has(err.code)) return { kind: 'transient', type: 'DataPlaneConnection', blame: 'destination', message };
    return { kind: 'permanent', type: 'DataPlaneRefused', blame: 'destination', message: `${peer} refused the data-plane session (${err.code}: ${message})` };
  }
  if (err instanceof HypervisorError) {
    if (PERMANENT_HYPERVISOR.has(err.code)) return { kind: 'permanent', type: err.code, blame: own, message: `host ${ctx.host}: the hypervisor refused: ${message}` };
    if (TRANSIENT_HYPERVISOR.has(err.code)) return { kind: 'transient', type: err.code, blame: own, message };
  }
  const code = errnoOf(err);
  const classified = code ? errnoFailure(code, message, ctx.host, own) : null;
  return classified ?? { kind: 'unknown', type: 'UnexpectedError', blame: own, message };
}

function stepContext(host: string, activityType: string, input: unknown): StepContext {
  const role = DESTINATION_STEPS.includes(activityType) ? 'destination' : SOURCE_STEPS.includes(activityType) ? 'source' : null;
  const ref = (input as { ref?: { destinationHost?: unknown } | null } | null)?.ref ?? (input as { destinationHost?: unknown } | null);
  const peer = typeof ref?.destinationHost === 'string' ? ref.destinationHost : null;
  return { host, role, peer };
}

/**
 * When each failing step first failed on this agent, so that "since" survives its retries (an
 * agent restart starts the count again). Entries of steps that never came back are dropped after a day.
 */
class RetryLedger {
  private readonly since = new Map<string, { sinceMs: number; cause: string; touchedMs: number }>();

  failed(key: string, cause: string): { sinceMs: number; causeChanged: boolean } {
    const now = Date.now();
    for (const [k, v] of this.since) if (now - v.touchedMs > 86_400_000) this.since.delete(k);
    const prev = this.since.get(key);
    const sinceMs = prev?.sinceMs ?? now;
    this.since.set(key, { sinceMs, cause, touchedMs: now });
    return { sinceMs, causeChanged: prev?.cause !== cause };
  }

  ended(key: string): void {
    this.since.delete(key);
  }
}

/** Whether to tell the workflow about this failed attempt: the first, a new cause, and then 2, 4, 8... */
function worthTelling(attempt: number, causeChanged: boolean): boolean {
  return causeChanged || (attempt & (attempt - 1)) === 0;
}

/**
 * The activity boundary: classifies what a step throws into the failure Temporal sees, logs it with
 * the migration's ids (the log context is the outer interceptor), and tells a migration workflow
 * that one of its steps retries, so its progress and the Web UI's current details say so.
 */
export function failureInterceptor(deps: { host: string; log: Logger }): ActivityInterceptorsFactory {
  const ledger = new RetryLedger();
  return (ctx: Context) => ({
    inbound: {
      execute: async (input, next) => {
        const info = ctx.info;
        const run = info.workflowExecution;
        const key = `${run?.workflowId}/${run?.runId}/${info.activityId}`;
        try {
          const result = await next(input);
          ledger.ended(key);
          return result;
        } catch (err) {
          if (err instanceof CancelledFailure || ctx.cancellationSignal.aborted) {
            ledger.ended(key);
            throw err;
          }
          const step = stepContext(deps.host, info.activityType, input.args[0]);
          const c = err instanceof ApplicationFailure ? passThrough(err, step) : classify(err, step);
          const retryable = c.kind === 'transient' || (c.kind === 'unknown' && info.attempt < UNKNOWN_ERROR_ATTEMPTS);
          const fields = { step: info.activityType, attempt: info.attempt, kind: c.kind, type: c.type, blame: c.blame };
          if (!retryable) {
            ledger.ended(key);
            const message = c.kind === 'unknown' ? `${c.message} (failed ${info.attempt} times with an error Ferry does not know: see the log of host ${deps.host})` : c.message;
            deps.log.error({ ...fields, err: errText(err) }, `${info.activityType} failed: ${message}`);
            const details: StepFailure = { host: deps.host, blame: c.blame };
            throw ApplicationFailure.create({ message, type: c.type, nonRetryable: true, details: [details] });
          }
          const { sinceMs, causeChanged } = ledger.failed(key, c.message);
          const retry: RetryState = { step: info.activityType, cause: c.message, attempt: info.attempt, sinceMs };
          deps.log.warn({ ...fields, since: new Date(sinceMs).toISOString(), err: errText(err) }, formatRetry(retry));
          if (run && info.workflowType === 'migrateVm' && worthTelling(info.attempt, causeChanged)) {
            ctx.client.workflow
              .getHandle(run.workflowId, run.runId)
              .signal(stepRetryingSignal, retry)
              .catch((e: unknown) => deps.log.debug({ err: String(e) }, 'could not tell the workflow that a step retries'));
          }
          const details: StepFailure = { host: deps.host, blame: c.blame, retry };
          throw ApplicationFailure.create({ message: c.message, type: c.type, nonRetryable: false, details: [details] });
        }
      },
    },
  });
}

/** A failure an activity raised on purpose keeps its type, message and retryability; it gains the details. */
function passThrough(err: ApplicationFailure, step: StepContext): Classified {
  const blame = (err.details?.[0] as StepFailure | undefined)?.blame ?? (err.type === 'DestinationLost' ? 'destination' : step.role);
  return { kind: err.nonRetryable ? 'permanent' : 'transient', type: err.type ?? 'ApplicationFailure', message: err.message, blame };
}

function errText(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}
