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

export type MigrationPhase =
  | 'validating'
  | 'waiting-for-slot'
  | 'preparing'
  | 'disk-precopy'
  | 'disk-dirty-rounds'
  | 'memory-precopy'
  | 'awaiting-cutover'
  | 'converging'
  | 'switchover'
  | 'postcopy'
  | 'finalizing'
  | 'rolling-back'
  | 'completed'
  | 'rolled-back'
  | 'failed';

export interface MigrationProgress {
  vmId: string;
  phase: MigrationPhase;
  sourceHost: string;
  destinationHost: string | null;
  mode: MigrationMode;
  round: number;
  disk: { totalBytes: number; sentBytes: number; remainingBytes: number; dirtyBlocks: number };
  memory: { totalBytes: number; sentBytes: number; remainingBytes: number; dirtyPages: number };
  transferBytesPerSecond: number;
  dirtyBytesPerSecond: number;
  etaSeconds: number | null;
  /** Never goes backwards. */
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
    transferBytesPerSecond: 0,
    dirtyBytesPerSecond: 0,
    etaSeconds: null,
    percent: 0,
    message: 'validating',
    epoch: null,
  };
}
