// Ferry's migrations of real QEMU guests (Linux under TCG, Ferry's guest program as the oracle):
// three-phase and precopy mode under randwrite, with real agents, a real Temporal server and QEMU's
// own migration stream carried over Ferry's data plane.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { useCluster, uniqueHosts } from '../support/cluster';
import { describeQemu, testQemuVm as qemuVm } from '../support/qemu';
import { guestWorking, migrateIntoSlowPostcopy } from '../support/host-checks';
import type { MigrationMode } from '../../common/migration';

const [a, b] = uniqueHosts('qa', 'qb');
const MiB = 1024 * 1024;
jest.setTimeout(600_000);

describeQemu('QEMU guests', () => {
  const t = useCluster([a, b], { FERRY_HYPERVISOR: 'qemu' });

  const guestReady = (host: string, vmId: string): Promise<void> => guestWorking(t.ferry, host, vmId);

  it.each<[MigrationMode]>([['tpm'], ['precopy']])('%s mode under randwrite: completes, one QEMU, the guest verifies clean', async (mode) => {
    const vm = qemuVm();
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await guestReady(a, vm.vmId);
    const report = await (await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], mode })).result();
    expect(report).toMatchObject({ outcome: 'completed', destinationHost: b, mode });
    expect(report.memoryBytesSent).toBeGreaterThan(0);
    expect(report.downtimeMs).not.toBeNull();
    expect((await t.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
    expect((await t.cluster.vmProcesses(b)).map((p) => p.vmId)).toContain(vm.vmId);
    const after = await t.ferry.hostCommand(b, 'vmInspect', { vmId: vm.vmId });
    expect(after.state).toBe('running');
    const verified = await t.ferry.hostCommand(b, 'vmVerify', { vmId: vm.vmId });
    expect({ violations: verified.violations, details: verified.details }).toEqual({ violations: 0, details: expect.any(String) as string });
  });

  it('postcopy at 1 MiB/s: the guest reads stale blocks, each is fetched on demand, and the guest verifies clean', async () => {
    const vm = qemuVm({ workload: 'mixed', diskBytes: 16 * MiB });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await guestReady(a, vm.vmId);
    const report = await (await migrateIntoSlowPostcopy(t.ferry, vm.vmId, a, b, MiB, 'memory-precopy')).result();
    expect(report).toMatchObject({ outcome: 'completed', destinationHost: b, mode: 'tpm' });
    expect(report.postcopyMs).toBeGreaterThan(0);
    expect(report.onDemandFetches).toBeGreaterThan(0);
    expect(report.staleWaits.waits).toBeGreaterThan(0);
    expect(report.staleWaits.longestWaitMs).toBeGreaterThan(0);
    await guestReady(b, vm.vmId);
    const verified = await t.ferry.hostCommand(b, 'vmVerify', { vmId: vm.vmId });
    expect({ violations: verified.violations }).toEqual({ violations: 0 });
    await t.ferry.hostCommand(b, 'vmDestroy', { vmId: vm.vmId });
  });

  /** Tracking blocks whose contents differ between two images. */
  async function differingBlocks(fileA: string, fileB: string, blockBytes: number): Promise<number> {
    const [x, y] = await Promise.all([fs.readFile(fileA), fs.readFile(fileB)]);
    let n = 0;
    for (let off = 0; off < x.length; off += blockBytes) if (!x.subarray(off, off + blockBytes).equals(y.subarray(off, off + blockBytes))) n++;
    return n;
  }
  const diskOf = (host: string, vmId: string) => path.join(t.cluster.home(host), 'vms', vmId, 'disk.img');

  it('moving back is incremental: it sends exactly the blocks the guest wrote since, and the guest verifies clean', async () => {
    const vm = qemuVm();
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await guestReady(a, vm.vmId);
    const first = await (await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] })).result();
    expect(first).toMatchObject({ outcome: 'completed', incremental: false });
    await guestReady(b, vm.vmId);

    // The guest writes on b, then pauses, so the blocks written since are known before the migration back.
    await t.ferry.hostCommand(b, 'vmPause', { vmId: vm.vmId });
    const blockBytes = 64 * 1024; // the default tracking block
    const written = await differingBlocks(diskOf(a, vm.vmId), diskOf(b, vm.vmId), blockBytes);
    expect(written).toBeGreaterThan(0);
    const back = await (await t.ferry.migrate({ vmId: vm.vmId, sourceHost: b, destinationHosts: [a] })).result();
    expect(back).toMatchObject({ outcome: 'completed', incremental: true });
    expect(back.diskBytesSent).toBe(written * blockBytes);
    expect(back.skippedBlocks).toBe(vm.diskBytes / blockBytes - written);
    expect(back.memoryBytesSent).toBeGreaterThan(0);
    expect((await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).state).toBe('paused');

    await t.ferry.hostCommand(a, 'vmResume', { vmId: vm.vmId });
    const verified = await t.ferry.hostCommand(a, 'vmVerify', { vmId: vm.vmId });
    expect({ violations: verified.violations }).toEqual({ violations: 0 });
  });
});
