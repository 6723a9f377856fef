// Typed errors of the Ferry client. Every error is a FerryRequestError with a `type` code; the
// subclasses are the ones a program is expected to handle. `refused` says that nothing happened:
// the request was turned down as given (fix the request and try again).
import {
  ApplicationFailure,
  ServiceError,
  WorkflowExecutionAlreadyStartedError,
  WorkflowFailedError,
  WorkflowNotFoundError,
  WorkflowUpdateFailedError,
} from '@temporalio/client';
import { hostTaskQueue, migrationWorkflowId } from '../common/types';

/** Failure types raised by the workflows and agents that mean "refused as asked", not "broke". */
const REFUSAL_TYPES = new Set([
  'ValidationError', 'VmNotFound', 'VmExists', 'VmNotRunning', 'InvalidArgument', 'OwnershipConflict', 'AbortRefused',
  'ApproveRefused', 'ResolveRefused', 'IncrementalUnavailable', 'BaseNotFound', 'BaseInUse',
]);

export class FerryRequestError extends Error {
  constructor(
    message: string,
    /** The failure type: an ApplicationFailure type from the workflow or an agent, or the error's own code. */
    readonly type: string | undefined,
  ) {
    super(message);
    this.name = 'FerryRequestError';
  }

  /** True when the request was refused as given and nothing changed. */
  get refused(): boolean {
    return this.type !== undefined && REFUSAL_TYPES.has(this.type);
  }
}

export class MigrationAlreadyRunning extends FerryRequestError {
  constructor(readonly vmId: string) {
    super(
      `VM ${vmId} is already migrating (workflow ${migrationWorkflowId(vmId)}): wait for it (ferry status ${vmId} --follow) or abort it (ferry abort ${vmId})`,
      'MigrationAlreadyRunning',
    );
    this.name = 'MigrationAlreadyRunning';
  }

  override get refused(): boolean {
    return true;
  }
}

/** The migration's input was refused by the workflow's validation (the message names the field). */
export class ValidationFailed extends FerryRequestError {
  constructor(message: string) {
    super(message, 'ValidationError');
    this.name = 'ValidationFailed';
  }
}

/** No agent polls the host's task queue, so nothing could run there. */
export class HostUnavailable extends FerryRequestError {
  constructor(readonly host: string) {
    super(`no agent is polling task queue ${hostTaskQueue(host)}: start \`ferry worker --host ${host}\` (or check the host name)`, 'HostUnavailable');
    this.name = 'HostUnavailable';
  }

  override get refused(): boolean {
    return true;
  }
}

/**
 * The agent whose workflow worker holds the migration's workflow did not answer a query in time
 * (stopped, overloaded, cut off): Temporal hands the workflow to another agent once it gives up on it.
 */
export class HostNotAnswering extends FerryRequestError {
  constructor(
    readonly host: string | null,
    worker: string | null,
    waitedMs: number,
  ) {
    const who = host !== null ? `host ${host}` : `the agent running the migration's workflow${worker ? ` (worker ${worker})` : ''}`;
    const fix = host !== null ? `is \`ferry worker --host ${host}\` running, and not stopped?` : 'is its agent running, and not stopped?';
    super(
      `${who} does not answer: it holds the migration's workflow and did not answer within ${Math.round(waitedMs / 1000)} s (${fix}); Temporal moves the workflow to another agent once it gives up on this one`,
      'HostNotAnswering',
    );
    this.name = 'HostNotAnswering';
  }
}

/** gRPC status codes of a Temporal call that failed, through the SDK's error wrappers. */
function grpcCodes(err: unknown): number[] {
  const codes: number[] = [];
  for (let cur: unknown = err; cur instanceof Error; cur = (cur as { cause?: unknown }).cause) {
    const code = (cur as { code?: unknown }).code;
    if (typeof code === 'number') codes.push(code);
  }
  return codes;
}

const GRPC_DEADLINE_EXCEEDED = 4;
const GRPC_UNAVAILABLE = 14;

/** The call ran out of time (a deadline of ours). */
export function isDeadlineExceeded(err: unknown): boolean {
  return grpcCodes(err).includes(GRPC_DEADLINE_EXCEEDED);
}

/** The Temporal server could not be reached (gone, restarting, or the network to it is down), or not in time. */
export function isTemporalUnavailable(err: unknown): boolean {
  const codes = grpcCodes(err);
  return codes.includes(GRPC_UNAVAILABLE) || codes.includes(GRPC_DEADLINE_EXCEEDED);
}

/** The VM does not exist on the host that was named. */
export class VmNotFound extends FerryRequestError {
  constructor(message: string) {
    super(message, 'VmNotFound');
    this.name = 'VmNotFound';
  }
}

/** No migration workflow exists for the VM (or none is running, for abort/approve/bandwidth). */
export class MigrationNotFound extends FerryRequestError {
  constructor(
    readonly vmId: string,
    running: boolean,
  ) {
    super(
      running
        ? `no running migration of VM ${vmId}: it has ended or never started (ferry status ${vmId})`
        : `no migration of VM ${vmId} found (workflow ${migrationWorkflowId(vmId)}): check the VM id (ferry list)`,
      'MigrationNotFound',
    );
    this.name = 'MigrationNotFound';
  }

  override get refused(): boolean {
    return true;
  }
}

/**
 * Turn a Temporal client error into a Ferry error whose message is the root cause: the innermost
 * failure message (an agent's or the workflow's own words), typed by its ApplicationFailure type.
 */
export function toFerryError(err: unknown, ctx: { vmId?: string; running?: boolean; refusal?: string } = {}): Error {
  if (err instanceof FerryRequestError) return err;
  if (err instanceof WorkflowExecutionAlreadyStartedError && ctx.vmId) return new MigrationAlreadyRunning(ctx.vmId);
  if (err instanceof WorkflowNotFoundError && ctx.vmId) return new MigrationNotFound(ctx.vmId, ctx.running ?? false);
  // The SDK's ServiceError says only what was asked ("Failed to query Workflow"); the server's reason is its cause.
  if (err instanceof ServiceError && err.cause instanceof Error && err.cause.message) return new Error(`${err.message}: ${err.cause.message}`, { cause: err });
  if (!(err instanceof WorkflowFailedError || err instanceof WorkflowUpdateFailedError || err instanceof ApplicationFailure)) {
    return err instanceof Error ? err : new Error(String(err));
  }
  let type: string | undefined = err instanceof ApplicationFailure ? err.type ?? undefined : undefined;
  let message = err.message;
  let cur: { cause?: unknown } = err;
  while (cur.cause instanceof Error) {
    const next = cur.cause as Error & { cause?: unknown };
    if (next.message) message = next.message;
    if (next instanceof ApplicationFailure && next.type) type = next.type;
    cur = next;
  }
  // A rejected update (abort, approve, resolve) is a refusal with the workflow's reason.
  if (err instanceof WorkflowUpdateFailedError) return new FerryRequestError(message, ctx.refusal ?? 'UpdateRefused');
  if (type === 'ValidationError') return new ValidationFailed(message);
  if (type === 'VmNotFound') return new VmNotFound(message);
  return new FerryRequestError(message, type);
}
