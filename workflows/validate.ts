// Pure input validation for migrateVm: every refusal names the fix.
import { ApplicationFailure } from '@temporalio/workflow';
import { DEFAULTS, type ConvergencePolicy, type MigrateVmInput, type MigrationMode } from '../common/migration';
import { MAX_BLOCK_BYTES, MIN_BLOCK_BYTES } from '../common/types';

export interface MigrationConfig {
  vmId: string;
  sourceHost: string;
  destinationHosts: string[];
  mode: MigrationMode;
  incremental: 'auto' | 'off' | 'require';
  blockBytes: number;
  convergence: ConvergencePolicy;
  downtimeTargetMs: number;
  bandwidthBytesPerSecond: number | null;
  cutover: 'auto' | 'manual';
  completionTimeoutSecondsPerGiB: number;
  onCompletionTimeout: 'abort' | 'switchover';
  destinationDeadlineSeconds: number;
}

const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

function invalid(message: string): never {
  throw ApplicationFailure.nonRetryable(message, 'ValidationError');
}

function oneOf<T extends string>(field: string, value: T | undefined, allowed: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  if (!allowed.includes(value)) invalid(`${field} must be one of ${allowed.join(', ')} (got ${JSON.stringify(value)})`);
  return value;
}

function positive(field: string, value: number | undefined, fallback: number, opts: { integer?: boolean; min?: number } = {}): number {
  if (value === undefined) return fallback;
  const min = opts.min ?? 0;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || (opts.integer && !Number.isInteger(value))) {
    invalid(`${field} must be ${opts.integer ? 'an integer' : 'a number'} >= ${min} (got ${JSON.stringify(value)})`);
  }
  return value;
}

/** Every field of MigrateVmInput: a misspelt one is refused, not silently ignored. */
const INPUT_FIELDS: readonly (keyof MigrateVmInput)[] = [
  'vmId', 'sourceHost', 'destinationHosts', 'mode', 'incremental', 'blockBytes', 'convergence', 'downtimeTargetMs',
  'bandwidthBytesPerSecond', 'cutover', 'completionTimeoutSecondsPerGiB', 'onCompletionTimeout', 'destinationDeadlineSeconds',
];
const CONVERGENCE_FIELDS: readonly (keyof ConvergencePolicy)[] = ['dirtyBlockThreshold', 'maxRounds', 'onStall'];

function knownFields(what: string, value: object, known: readonly string[]): void {
  const unknown = Object.keys(value).filter((k) => !known.includes(k));
  if (unknown.length > 0) invalid(`${what} has unknown field ${unknown.map((k) => JSON.stringify(k)).join(', ')}: the fields are ${known.join(', ')}`);
}

/** A data-plane limit: a positive number of bytes per second, or null for unlimited. */
export function bandwidthError(bw: unknown): string | null {
  if (bw === null || (typeof bw === 'number' && bw > 0 && Number.isFinite(bw))) return null;
  return `bandwidthBytesPerSecond must be a positive number of bytes per second, or null for unlimited (got ${JSON.stringify(bw)})`;
}

export function validateInput(input: MigrateVmInput): MigrationConfig {
  if (!input || typeof input !== 'object' || Array.isArray(input)) invalid('the input must be an object with vmId, sourceHost and destinationHosts');
  knownFields('the input', input, INPUT_FIELDS);
  if (!NAME.test(String(input.vmId ?? ''))) invalid(`vmId ${JSON.stringify(input.vmId)} is not a valid VM id: use 1-63 of a-z, 0-9, '.', '_', '-'`);
  if (!NAME.test(String(input.sourceHost ?? ''))) invalid(`sourceHost ${JSON.stringify(input.sourceHost)} is not a valid host name`);
  const dests = input.destinationHosts;
  if (!Array.isArray(dests) || dests.length === 0) invalid('destinationHosts must name at least one destination host');
  for (const d of dests) if (!NAME.test(String(d))) invalid(`destination ${JSON.stringify(d)} is not a valid host name`);
  if (dests.includes(input.sourceHost)) {
    invalid(`the source host ${input.sourceHost} is also a destination: a VM cannot migrate to the host it runs on; name another destination`);
  }
  if (new Set(dests).size !== dests.length) invalid(`destinationHosts lists a host twice: ${dests.join(', ')}`);
  const blockBytes = positive('blockBytes', input.blockBytes, DEFAULTS.blockBytes, { integer: true, min: MIN_BLOCK_BYTES });
  if (blockBytes > MAX_BLOCK_BYTES || (blockBytes & (blockBytes - 1)) !== 0) {
    invalid(`blockBytes must be a power of two between ${MIN_BLOCK_BYTES} and ${MAX_BLOCK_BYTES} (got ${blockBytes})`);
  }
  const conv = input.convergence ?? {};
  if (typeof conv !== 'object' || conv === null || Array.isArray(conv)) invalid(`convergence must be an object with ${CONVERGENCE_FIELDS.join(', ')} (got ${JSON.stringify(conv)})`);
  knownFields('convergence', conv, CONVERGENCE_FIELDS);
  const bw = input.bandwidthBytesPerSecond;
  const bwError = bw === undefined ? null : bandwidthError(bw);
  if (bwError) invalid(bwError);
  return {
    vmId: input.vmId,
    sourceHost: input.sourceHost,
    destinationHosts: dests,
    mode: oneOf('mode', input.mode, ['tpm', 'precopy'], DEFAULTS.mode),
    incremental: oneOf('incremental', input.incremental, ['auto', 'off', 'require'], DEFAULTS.incremental),
    blockBytes,
    convergence: {
      dirtyBlockThreshold: positive('convergence.dirtyBlockThreshold', conv.dirtyBlockThreshold, DEFAULTS.convergence.dirtyBlockThreshold, { integer: true }),
      maxRounds: positive('convergence.maxRounds', conv.maxRounds, DEFAULTS.convergence.maxRounds, { integer: true, min: 1 }),
      onStall: oneOf('convergence.onStall', conv.onStall, ['throttle', 'switchover'], DEFAULTS.convergence.onStall),
    },
    downtimeTargetMs: positive('downtimeTargetMs', input.downtimeTargetMs, DEFAULTS.downtimeTargetMs, { min: 1 }),
    bandwidthBytesPerSecond: bw ?? null,
    cutover: oneOf('cutover', input.cutover, ['auto', 'manual'], DEFAULTS.cutover),
    completionTimeoutSecondsPerGiB: positive('completionTimeoutSecondsPerGiB', input.completionTimeoutSecondsPerGiB, DEFAULTS.completionTimeoutSecondsPerGiB, { min: 1 }),
    onCompletionTimeout: oneOf('onCompletionTimeout', input.onCompletionTimeout, ['abort', 'switchover'], DEFAULTS.onCompletionTimeout),
    destinationDeadlineSeconds: positive('destinationDeadlineSeconds', input.destinationDeadlineSeconds, DEFAULTS.destinationDeadlineSeconds, { min: 1 }),
  };
}
