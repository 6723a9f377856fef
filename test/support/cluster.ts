// Test helpers over the harness: a cluster on the jest run's Temporal server, and the reference oracle.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { LocalCluster, type ClusterOptions } from '../../harness/cluster';
import { FerryClient, type MigrationHandle } from '../../client/ferry-client';
import type { MigrationProgress } from '../../common/migration';
import { referenceRun } from '../../hypervisor/sim/guest';
import type { VmSpec } from '../../hypervisor/driver';
import { vmId as asVmId, type Workload } from '../../common/types';
import { testTemporalAddress } from './temporal';

/** Options of a test cluster beyond its hosts and their shared environment (see ClusterOptions). */
export type TestClusterOptions = Pick<ClusterOptions, 'metrics' | 'hostEnv' | 'root'>;

export async function startCluster(hosts: string[], env?: Record<string, string>, opts: TestClusterOptions = {}): Promise<{ cluster: LocalCluster; ferry: FerryClient }> {
  const cluster = await LocalCluster.start({ temporalAddress: testTemporalAddress(), hosts, env, taskQueue: TEST_TASK_QUEUE, ...opts });
  return { cluster, ferry: cluster.ferryClient() };
}

/** The cluster of one test file: started before its tests, stopped after them. */
export function useCluster(hosts: string[], env?: Record<string, string>, opts: TestClusterOptions | (() => Promise<TestClusterOptions>) = {}): { readonly cluster: LocalCluster; readonly ferry: FerryClient } {
  let started: { cluster: LocalCluster; ferry: FerryClient } | null = null;
  beforeAll(async () => {
    started = await startCluster(hosts, env, typeof opts === 'function' ? await opts() : opts);
  });
  afterAll(async () => {
    await started?.cluster.stop();
  });
  const get = () => {
    if (!started) throw new Error('the cluster starts in beforeAll: use it inside a test');
    return started;
  };
  return {
    get cluster() {
      return get().cluster;
    },
    get ferry() {
      return get().ferry;
    },
  };
}

export interface TestVm {
  vmId: string;
  diskBytes: number;
  memoryBytes: number;
  workload: Workload;
  seed: number;
  opsPerSecond: number;
  fill: boolean;
}

// Test files share one Temporal server, and a jest worker runs several files: names carry a run tag.
const RUN_TAG = `${process.pid.toString(36)}${Math.random().toString(36).slice(2, 6)}`;

/**
 * The workflow task queue of this test file's clusters (and its `ferry` commands): the files running at
 * the same time on the shared server would otherwise run each other's workflows, with their own builds
 * and admission limits.
 */
export const TEST_TASK_QUEUE = `ferry-migrations-${RUN_TAG}`;

/** Host names of this test file, distinct from every other file's (they share the task queues' namespace). */
export function uniqueHosts(...names: string[]): string[] {
  return names.map((n) => `${n}-${RUN_TAG}`);
}

let counter = 0;
export function testVm(workload: Workload, over: Partial<TestVm> = {}): TestVm {
  counter++;
  return {
    vmId: `vm-${workload}-${RUN_TAG}-${counter}`,
    diskBytes: 32 * 1024 * 1024,
    memoryBytes: 8 * 1024 * 1024,
    workload,
    seed: 7 + counter,
    opsPerSecond: 3000,
    fill: true,
    ...over,
  };
}

/** Hashes of the same guest run to `ops` operations without any migration. */
export async function referenceHashes(vm: TestVm, ops: number): Promise<{ disk: string; memory: string }> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-ref-'));
  try {
    const spec: VmSpec = { ...vm, vmId: asVmId(vm.vmId) };
    return await referenceRun(spec, ops, dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** The guest's own check where it runs (the simulator: it runs on, halts, and disk and memory equal a reference run's). */
export async function expectGuestCorrect(ferry: FerryClient, host: string, vm: TestVm): Promise<void> {
  const verified = await ferry.hostCommand(host, 'vmVerify', { vmId: vm.vmId });
  expect({ violations: verified.violations, details: verified.details }).toEqual({ violations: 0, details: expect.any(String) as string });
}

/** Poll a migration's progress until `pred` holds. */
export async function waitForProgress(handle: MigrationHandle, what: string, pred: (p: MigrationProgress) => boolean, timeoutMs = 120_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const p = await handle.progress().catch(() => null);
    if (p && pred(p)) return;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what} (last phase ${p?.phase})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
