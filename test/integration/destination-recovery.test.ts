// A destination host that was down while its migration rolled back: when its agent comes back, the
// stale incoming shell is fenced and removed, and the host can receive the VM again.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { startCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import type { LocalCluster } from '../../harness/cluster';
import type { FerryClient } from '../../client/ferry-client';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

let cluster: LocalCluster;
let ferry: FerryClient;

beforeAll(async () => {
  ({ cluster, ferry } = await startCluster([a, b]));
});

afterAll(async () => {
  await cluster?.stop();
});

async function shells(host: string): Promise<string[]> {
  return (await fs.readdir(path.join(cluster.home(host), 'incoming')).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
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
  await ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await ferry.migrate({
    vmId: vm.vmId,
    sourceHost: a,
    destinationHosts: [b],
    bandwidthBytesPerSecond: 2 * 1024 * 1024,
    destinationDeadlineSeconds: 5,
  });
  await waitForProgress(handle, 'disk precopy', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 0);
  await cluster.killAgent(b);
  await handle.abort('destination down for maintenance');
  const report = await handle.result();
  expect(report.outcome).toBe('rolled-back');

  // The host was down: its shell (record and incoming VM process) is still there.
  expect(await shells(b)).toHaveLength(1);
  expect((await cluster.vmProcesses(b)).map((p) => p.vmId)).toContain(vm.vmId);

  await cluster.startAgent(b);
  await until('the stale shell to be removed', async () => (await shells(b)).length === 0 && !(await cluster.vmProcesses(b)).some((p) => p.vmId === vm.vmId));
  const own = JSON.parse(await fs.readFile(path.join(cluster.home(b), 'ownership', `${vm.vmId}.json`), 'utf8')) as { state: string };
  expect(own.state).toBe('aborted');

  // The VM kept running on the source with correct data, and the host can receive it again.
  const again = await ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] });
  expect((await again.result()).outcome).toBe('completed');
  await expectGuestCorrect(ferry, b, vm);
});
