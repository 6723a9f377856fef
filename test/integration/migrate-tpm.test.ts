import { useCluster, testVm, expectGuestCorrect, uniqueHosts } from '../support/cluster';
import { WORKLOADS } from '../../common/types';
import type { MigrationMode } from '../../common/migration';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

const t = useCluster([a, b]);

const cases: [string, MigrationMode][] = WORKLOADS.flatMap((w) => [
  [w, 'tpm'] as [string, MigrationMode],
  [w, 'precopy'] as [string, MigrationMode],
]);

describe.each(cases)('%s guest, %s mode', (workload, mode) => {
  it('migrates a→b with the guest running, one copy, no stale read, and hashes equal to the reference run', async () => {
    const vm = testVm(workload as never);
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], mode });
    const report = await handle.result();
    expect(report).toMatchObject({ outcome: 'completed', destinationHost: b, mode });
    expect(report.diskBytesSent).toBeGreaterThan(0);
    expect(report.memoryBytesSent).toBeGreaterThanOrEqual(vm.memoryBytes);

    // Exactly one VM process, on the destination.
    expect((await t.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
    expect((await t.cluster.vmProcesses(b)).map((p) => p.vmId)).toContain(vm.vmId);

    await expectGuestCorrect(t.ferry, b, vm);
  });
});

describe('an idle guest', () => {
  it('dirties (almost) no memory, even at many operations per second: its memory crosses about once', async () => {
    // 20000 operations per second stamped 16 bytes each all over memory before idle meant idle.
    const vm = testVm('idle', { opsPerSecond: 20_000, fill: false });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const report = await (await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] })).result();
    expect(report.outcome).toBe('completed');
    // The full pass, then one page per round (its timer tick) and the freeze.
    expect(report.memoryBytesSent).toBeLessThanOrEqual(vm.memoryBytes + 32 * 4096);
    await expectGuestCorrect(t.ferry, b, vm);
  });
});
