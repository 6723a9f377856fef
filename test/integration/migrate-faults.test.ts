// Crashes of host agents in the middle of a migration: the workflow resumes from the last heartbeat
// and completes with correct data. (The full fault matrix is the chaos harness.)
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import { isAlive } from '../../harness/cluster';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

const t = useCluster([a, b]);

const waitFor = waitForProgress;

async function vmPid(host: string, vmId: string): Promise<number> {
  const p = (await t.cluster.vmProcesses(host)).find((v) => v.vmId === vmId);
  if (!p) throw new Error(`no VM process for ${vmId} on ${host}`);
  return p.pid;
}

it('kill -9 of the source agent during the disk precopy: the VM lives on, the pass resumes from its heartbeat', async () => {
  const vm = testVm('randwrite', { opsPerSecond: 20, diskBytes: 64 * 1024 * 1024 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 4 * 1024 * 1024 });
  // The server has a heartbeat with a cursor well into the disk.
  await waitFor(handle, 'a disk-precopy heartbeat past 16 MiB', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 16 * 1024 * 1024);
  const pid = await vmPid(a, vm.vmId);
  await t.cluster.killAgent(a);
  expect(isAlive(pid)).toBe(true);
  await new Promise((r) => setTimeout(r, 1000));
  await t.cluster.startAgent(a);
  const report = await handle.result();
  expect(report.outcome).toBe('completed');
  expect(report.diskPrecopyResumedFromBlock).toBeGreaterThan(0);

  expect((await t.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
  await expectGuestCorrect(t.ferry, b, vm);
});

it('kill -9 of the destination agent during the postcopy: the VM keeps running there, reads wait, the push resumes', async () => {
  // small memory, so the slow link makes the postcopy (not the memory rounds) last seconds
  const vm = testVm('mixed', { opsPerSecond: 3000, memoryBytes: 2 * 1024 * 1024 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await t.ferry.migrate({
    vmId: vm.vmId,
    sourceHost: a,
    destinationHosts: [b],
    convergence: { maxRounds: 1, dirtyBlockThreshold: 1_000_000 },
    downtimeTargetMs: 10_000,
  });
  await waitFor(handle, 'memory precopy', (p) => p.phase === 'memory-precopy');
  await handle.setBandwidth(1024 * 1024);
  await waitFor(handle, 'postcopy', (p) => p.phase === 'postcopy');
  const pid = await vmPid(b, vm.vmId);
  await t.cluster.killAgent(b);
  await new Promise((r) => setTimeout(r, 2000));
  expect(isAlive(pid)).toBe(true);
  await t.cluster.startAgent(b);
  await handle.setBandwidth(null);
  const report = await handle.result();
  expect(report.outcome).toBe('completed');
  expect(await vmPid(b, vm.vmId)).toBe(pid); // the same VM process ran throughout

  expect((await t.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
  await expectGuestCorrect(t.ferry, b, vm);
});
