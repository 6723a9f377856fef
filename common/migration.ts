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
 * completed, skipping those that do not apply (waiting-for-slot, awaiting-cutover, postcopy); or, from
 * any phase before the switchover, rolling-back and then preparing again (the next destination) or
 * rolled-back. A failed workflow keeps its last phase and Temporal's status says FAILED.
 */
export const MIGRATION_PHASES = [
  'validating',
  'waiting-for-slot',
  'preparing',
  'disk-precopy',
  'disk-dirty-rounds',
  'memory-precopy',
  'awaiting-cutover',
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
  diskRounds: number;
  memoryRounds: number;
  postcopyMs: number;
  onDemandFetches: number;
  throttled: boolean;
  /** Block where the disk full pass resumed after a retry (0 = it ran in one go). */
  diskPrecopyResumedFromBlock: number;
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
  };
}
