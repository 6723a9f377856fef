// Crashes of host agents in the middle of a migration: the workflow resumes from the last heartbeat
// and completes with correct data. (The full fault matrix is the chaos harness.)
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import { isAlive } from '../../harness/cluster';
import { migrateIntoSlowPostcopy, vmPid as pidOn } from '../support/host-checks';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

const t = useCluster([a, b]);

const waitFor = waitForProgress;
const vmPid = (host: string, vmId: string) => pidOn(t.cluster, host, vmId);

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

it('kill -9 of the destination agent during the postcopy: the VM keeps running there, reads wait, the push resumes, the report shows the wait', async () => {
  // small memory, so the slow link makes the postcopy (not the memory rounds) last seconds
  const vm = testVm('mixed', { opsPerSecond: 3000, diskBytes: 8 * 1024 * 1024, memoryBytes: 2 * 1024 * 1024 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await migrateIntoSlowPostcopy(t.ferry, vm.vmId, a, b, 1024 * 1024, 'start');
  await waitFor(handle, 'postcopy', (p) => p.phase === 'postcopy');
  const pid = await vmPid(b, vm.vmId);
  const killedAt = Date.now();
  await t.cluster.killAgent(b);
  await new Promise((r) => setTimeout(r, 2000));
  expect(isAlive(pid)).toBe(true);
  await t.cluster.startAgent(b);
  const downMs = Date.now() - killedAt;
  await handle.setBandwidth(null);
  const report = await handle.result();
  expect(report.outcome).toBe('completed');
  // What the guest went through is in the report: the postcopy, measured by the destination across
  // its agent's restart, and a stale read that waited for the agent to come back.
  expect(report.postcopyMs).toBeGreaterThan(downMs);
  expect(report.staleWaits.longestWaitMs).toBeGreaterThan(1500);
  expect(await vmPid(b, vm.vmId)).toBe(pid); // the same VM process ran throughout

  expect((await t.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
  await expectGuestCorrect(t.ferry, b, vm);
});
