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
