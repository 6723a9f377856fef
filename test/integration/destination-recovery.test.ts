// A destination host that was down while its migration rolled back: when its agent comes back, the
// stale incoming shell is fenced and removed, and the host can receive the VM again.
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import { ownershipOn, shells as shellsOn, until } from '../support/host-checks';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

const t = useCluster([a, b]);

const shells = (host: string) => shellsOn(t.cluster, host);

it('a rolled-back migration whose destination was down: the shell is cleaned up when the host returns', async () => {
  const vm = testVm('mixed', { opsPerSecond: 200, diskBytes: 32 * 1024 * 1024 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await t.ferry.migrate({
    vmId: vm.vmId,
    sourceHost: a,
    destinationHosts: [b],
    bandwidthBytesPerSecond: 2 * 1024 * 1024,
    destinationDeadlineSeconds: 5,
  });
  await waitForProgress(handle, 'disk precopy', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 0);
  await t.cluster.killAgent(b);
  await handle.abort('destination down for maintenance');
  const report = await handle.result();
  expect(report.outcome).toBe('rolled-back');

  // The host was down: its shell (record and incoming VM process) is still there.
  expect(await shells(b)).toHaveLength(1);
  expect((await t.cluster.vmProcesses(b)).map((p) => p.vmId)).toContain(vm.vmId);

  await t.cluster.startAgent(b);
  await until('the stale shell to be removed', async () => (await shells(b)).length === 0 && !(await t.cluster.vmProcesses(b)).some((p) => p.vmId === vm.vmId));
  expect(await ownershipOn(t.cluster, b, vm.vmId)).toMatchObject({ state: 'aborted' });

  // The VM kept running on the source with correct data, and the host can receive it again.
  const again = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] });
  expect((await again.result()).outcome).toBe('completed');
  await expectGuestCorrect(t.ferry, b, vm);
});
