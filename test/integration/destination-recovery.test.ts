// A destination host that was down while its migration rolled back: when its agent comes back, the
// stale incoming shell is fenced and removed, and the host can receive the VM again.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

const t = useCluster([a, b]);

async function shells(host: string): Promise<string[]> {
  return (await fs.readdir(path.join(t.cluster.home(host), 'incoming')).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
}

async function until(what: string, pred: () => Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

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
  const own = JSON.parse(await fs.readFile(path.join(t.cluster.home(b), 'ownership', `${vm.vmId}.json`), 'utf8')) as { state: string };
  expect(own.state).toBe('aborted');

  // The VM kept running on the source with correct data, and the host can receive it again.
  const again = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] });
  expect((await again.result()).outcome).toBe('completed');
  await expectGuestCorrect(t.ferry, b, vm);
});
