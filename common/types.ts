// Domain types. Branded so a VmId cannot be passed where a HostName is expected.
export type Brand<T, B extends string> = T & { readonly __brand: B };

export type VmId = Brand<string, 'VmId'>;
export type HostName = Brand<string, 'HostName'>;
export type MigrationId = Brand<string, 'MigrationId'>;
export type Epoch = Brand<number, 'Epoch'>;
export type BlockIndex = Brand<number, 'BlockIndex'>;
export type PageIndex = Brand<number, 'PageIndex'>;

const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

export class InvalidNameError extends Error {}

function checkName(kind: string, value: string): void {
  if (typeof value !== 'string' || !NAME.test(value)) {
    throw new InvalidNameError(
      `invalid ${kind} ${JSON.stringify(value)}: use 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit`,
    );
  }
}

export function vmId(value: string): VmId {
  checkName('VM id', value);
  return value as VmId;
}

export function hostName(value: string): HostName {
  checkName('host name', value);
  return value as HostName;
}

export function migrationId(value: string): MigrationId {
  return value as MigrationId;
}

export function epoch(value: number): Epoch {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`invalid epoch ${value}`);
  return value as Epoch;
}

export const hostTaskQueue = (host: HostName | string): string => `host-${host}`;

/** The Temporal worker identity of a host's agent: it names the host, so a silent worker can be named. */
export const agentIdentity = (host: string, pid: number, machine: string): string => `ferry-agent ${host} ${pid}@${machine}`;
export function hostOfIdentity(identity: string): string | null {
  return /^ferry-agent (\S+) /.exec(identity)?.[1] ?? null;
}
/** The task queue of Ferry's workflows, which the agents of one Ferry deployment share (--task-queue, FERRY_TASK_QUEUE). */
export const DEFAULT_TASK_QUEUE = 'ferry-migrations';
export const migrationWorkflowId = (vm: VmId | string): string => `migrate-${vm}`;

export const SECTOR_BYTES = 512;
export const PAGE_BYTES = 4096;
export const MIN_BLOCK_BYTES = 4096;
export const MAX_BLOCK_BYTES = 1 << 20;
export const DEFAULT_BLOCK_BYTES = 64 * 1024;

export type Workload = 'idle' | 'memhog' | 'seqwrite' | 'randwrite' | 'mixed' | 'readmostly';
export const WORKLOADS: readonly Workload[] = ['idle', 'memhog', 'seqwrite', 'randwrite', 'mixed', 'readmostly'];

/**
 * Guest operations per second when a VM is created without a rate (0 = as fast as it can). idle
 * ticks like a 100 Hz timer; memhog exists to dirty memory as fast as it can; the disk workloads run
 * at a rate a migration over a 1 Gbit/s link converges on (seqwrite writes 256 KiB per operation).
 */
export const DEFAULT_OPS_PER_SECOND: Readonly<Record<Workload, number>> = {
  idle: 100,
  memhog: 0,
  seqwrite: 50,
  randwrite: 500,
  mixed: 500,
  readmostly: 500,
};
