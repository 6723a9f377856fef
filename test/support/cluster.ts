// Test helpers over the harness: a cluster on the jest run's Temporal server, and the reference oracle.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { LocalCluster } from '../../harness/cluster';
import { FerryClient } from '../../client/ferry-client';
import { referenceRun } from '../../hypervisor/sim/guest';
import type { VmSpec } from '../../hypervisor/driver';
import { vmId as asVmId, type Workload } from '../../common/types';
import { testTemporalAddress } from './temporal';

export async function startCluster(hosts: string[], env?: Record<string, string>): Promise<{ cluster: LocalCluster; ferry: FerryClient }> {
  const cluster = await LocalCluster.start({ temporalAddress: testTemporalAddress(), hosts, env });
  return { cluster, ferry: new FerryClient(cluster.client) };
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

let counter = 0;
export function testVm(workload: Workload, over: Partial<TestVm> = {}): TestVm {
  counter++;
  return {
    vmId: `vm-${workload}-${process.pid}-${counter}`,
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

/** Run the guest on `host` to exactly `ops` operations and return its hashes and status. */
export async function finishGuest(ferry: FerryClient, host: string, vmId: string, ops: number) {
  const status = await ferry.hostCommand(host, 'vmRunUntil', { vmId, ops });
  const hashes = await ferry.hostCommand(host, 'vmHashes', { vmId });
  return { status, hashes };
}
