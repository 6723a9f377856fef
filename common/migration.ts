// What a migration is, as the workflow, the client and the CLI see it. Small metadata only:
// block data, bitmaps and secrets never appear in these types (DESIGN invariant 6).

export type MigrationMode = 'tpm' | 'precopy';
export type IncrementalPolicy = 'auto' | 'off' | 'require';
export type CutoverPolicy = 'auto' | 'manual';
export type StallAction = 'throttle' | 'switchover';
export type TimeoutAction = 'abort' | 'switchover';

export interface ConvergencePolicy {
  /** Go to the freeze once a dirty round leaves at most this many blocks. */
  dirtyBlockThreshold: number;
  maxRounds: number;
  /** What to do when rounds stop shrinking. */
  onStall: StallAction;
}

export interface MigrateVmInput {
  vmId: string;
  sourceHost: string;
  /** Candidate destinations, tried in order. */
  destinationHosts: string[];
  mode?: MigrationMode;
  incremental?: IncrementalPolicy;
  blockBytes?: number;
  convergence?: Partial<ConvergencePolicy>;
  /** Target for the freeze (ms); memory rounds go on until the last dirty pages fit it. */
  downtimeTargetMs?: number;
  /** Data-plane limit in bytes per second; null = unlimited. */
  bandwidthBytesPerSecond?: number | null;
  cutover?: CutoverPolicy;
  /** Completion timeout, per GiB of disk+memory (s), and what to do when it expires. */
  completionTimeoutSecondsPerGiB?: number;
  onCompletionTimeout?: TimeoutAction;
  /** How long to keep retrying an unreachable destination before rolling back (s). */
  destinationDeadlineSeconds?: number;
}

/**
 * The phases, in the order a migration goes through them (README, "Phases"): from validating to
 * completed, skipping those that do not apply (waiting-for-slot, awaiting-cutover and converging without a manual
 * cutover, postcopy); or, from
 * any phase before the switchover, rolling-back and then preparing again (the next destination) or
 * rolled-back. A failed workflow keeps its last phase and Temporal's status says FAILED.
 */
export const MIGRATION_PHASES = [
  'validating',
  'waiting-for-slot',
  'preparing',
  'disk-precopy',
  'disk-dirty-rounds',
  'awaiting-cutover',
  'converging',
  'memory-precopy',
  'switchover',
  'postcopy',
  'finalizing',
  'completed',
  'rolling-back',
  'rolled-back',
  'failed',
] as const;
export type MigrationPhase = (typeof MIGRATION_PHASES)[number];

export interface MigrationProgress {
  vmId: string;
  phase: MigrationPhase;
  sourceHost: string;
  destinationHost: string | null;
  mode: MigrationMode;
  round: number;
  disk: { totalBytes: number; sentBytes: number; remainingBytes: number; dirtyBlocks: number };
  memory: { totalBytes: number; sentBytes: number; remainingBytes: number; dirtyPages: number };
  /** Acknowledged bytes per second over the last few seconds: 0 when nothing moved, null until measured (common/progress.ts). */
  transferBytesPerSecond: number | null;
  dirtyBytesPerSecond: number;
  /** What is left of the plan at the current rate; null while the rate is unknown or 0. */
  etaSeconds: number | null;
  /** Of the plan (first pass, rounds, memory, postcopy), from acknowledged bytes; never goes backwards. */
  percent: number;
  message: string;
  epoch: number | null;
  /** The step that is being retried right now, and why (null while nothing fails). */
  retrying: RetryState | null;
  /** The destination's decision, once it prepared: incremental, or a full copy and why. */
  incremental: { incremental: boolean; fallbackReason: string | null } | null;
}

/** A host step that failed and is retried: what failed, how often, since when. */
export interface RetryState {
  /** The activity, e.g. copyDiskFirstPass. */
  step: string;
  cause: string;
  /** Attempts that failed so far. */
  attempt: number;
  /** When the step first failed (ms since the epoch, the agent's clock). */
  sinceMs: number;
}

/** "retrying: <cause> (attempt N, since T)": the same words in the status, the bar, the Web UI and the agent log. */
export function formatRetry(r: RetryState): string {
  return `retrying: ${r.cause} (attempt ${r.attempt}, since ${new Date(r.sinceMs).toISOString().replace(/\.\d+Z$/, 'Z')})`;
}

/** What every failure of a host step carries (ApplicationFailure details[0]). */
export interface StepFailure {
  /** The host whose agent ran the step. */
  host: string;
  /** Whose problem it is: a destination's lets the migration try the next destination; a source's ends it. */
  blame: 'source' | 'destination' | null;
  /** Set while the step is retried. */
  retry?: RetryState;
}

/** Host steps that run on the destination: a failure of theirs is the destination's, unless it says otherwise. */
export const DESTINATION_STEPS: readonly string[] = ['prepareDestination', 'abortDestination', 'finishDestination', 'revokeDestination'];
/** Host steps that run on the source (requestSlot runs on either). */
export const SOURCE_STEPS: readonly string[] = [
  'inspectSource', 'copyDiskFirstPass', 'copyDiskDirty', 'setThrottle', 'switchover', 'postcopy', 'rollbackSource', 'resumeSourceAfterLoss', 'finalizeSource',
];

/** An operator's decision that a destination is lost for good (`ferry resolve VM --destination-lost`). */
export interface DestinationLostResolution {
  reason: string;
  /** Who decided (the CLI sends user@host). */
  by: string;
}

export interface MigrationReport {
  vmId: string;
  outcome: 'completed' | 'rolled-back';
  reason?: string;
  sourceHost: string;
  destinationHost: string | null;
  /** Destinations tried before the one that worked (or all of them, when rolled back). */
  failedDestinations: { host: string; reason: string }[];
  mode: MigrationMode;
  incremental: boolean;
  incrementalFallbackReason?: string;
  skippedBlocks: number;
  epoch: number;
  totalMs: number;
  downtimeMs: number | null;
  diskBytesSent: number;
  memoryBytesSent: number;
  /** Dirty-block rounds sent after the first pass (the precopy rounds, those while awaiting the cutover and before the freeze). */
  diskRounds: number;
  memoryRounds: number;
  /** From the commit to the last stale block's arrival, measured by the destination (ms). */
  postcopyMs: number;
  onDemandFetches: number;
  /** Guest I/O that waited for a stale block during postcopy, as the destination served it. */
  staleWaits: { waits: number; longestWaitMs: number; totalWaitMs: number };
  /** The hypervisor's own measure of the freeze (QEMU's `downtime`), beside the guest-observed one. */
  hypervisorDowntimeMs: number | null;
  throttled: boolean;
  /** Block where the disk full pass resumed after a retry (0 = it ran in one go). */
  diskPrecopyResumedFromBlock: number;
  /** Size of a bitmap block (bytes): the unit of every disk round. */
  blockBytes: number;
  /** The VM was paused when the migration began: it moved paused (a cold migration) and stays paused. */
  coldMigration: boolean;
  /** An operator declared the destination lost after the Final message (ferry resolve). */
  resolution?: DestinationLostResolution & { host: string; at: string };
}

export const DEFAULTS = {
  mode: 'tpm' as MigrationMode,
  incremental: 'auto' as IncrementalPolicy,
  blockBytes: 64 * 1024,
  convergence: { dirtyBlockThreshold: 64, maxRounds: 12, onStall: 'throttle' as StallAction },
  downtimeTargetMs: 50,
  cutover: 'auto' as CutoverPolicy,
  completionTimeoutSecondsPerGiB: 600,
  onCompletionTimeout: 'abort' as TimeoutAction,
  destinationDeadlineSeconds: 120,
};

/** Progress before anything has happened. */
export function initialProgress(vmId: string, sourceHost = '', mode: MigrationMode = 'tpm'): MigrationProgress {
  return {
    vmId,
    phase: 'validating',
    sourceHost,
    destinationHost: null,
    mode,
    round: 0,
    disk: { totalBytes: 0, sentBytes: 0, remainingBytes: 0, dirtyBlocks: 0 },
    memory: { totalBytes: 0, sentBytes: 0, remainingBytes: 0, dirtyPages: 0 },
    transferBytesPerSecond: null,
    dirtyBytesPerSecond: 0,
    etaSeconds: null,
    percent: 0,
    message: 'validating',
    epoch: null,
    retrying: null,
    incremental: null,
  };
}
