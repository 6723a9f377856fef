// The Temporal server is killed (SIGKILL) in the middle of a migration and started again on the same
// SQLite file: the workflow continues from its history and completes with correct data.
import { OwnServer } from '../support/own-server';
import { testVm, expectGuestCorrect } from '../support/cluster';

jest.setTimeout(300_000);

let own: OwnServer | null = null;

afterAll(async () => {
  await own?.stop();
});

it('a migration survives a kill -9 and restart of the Temporal server', async () => {
  own = await OwnServer.start(['a', 'b']);
  const { ferry, cluster } = own;

  const vm = testVm('randwrite', { opsPerSecond: 30, diskBytes: 48 * 1024 * 1024 });
  await ferry.hostCommand('a', 'vmCreate', vm);
  const handle = await ferry.migrate({ vmId: vm.vmId, sourceHost: 'a', destinationHosts: ['b'], bandwidthBytesPerSecond: 6 * 1024 * 1024 });
  for (;;) {
    const p = await handle.progress();
    if (p.phase === 'disk-precopy' || p.phase === 'disk-dirty-rounds') break;
    await new Promise((r) => setTimeout(r, 200));
  }

  await own.kill();
  await new Promise((r) => setTimeout(r, 2000));
  await own.restart();

  const report = await handle.result();
  expect(report.outcome).toBe('completed');
  expect((await cluster.vmProcesses('a')).map((p) => p.vmId)).not.toContain(vm.vmId);
  expect((await cluster.vmProcesses('b')).map((p) => p.vmId)).toContain(vm.vmId);
  await expectGuestCorrect(ferry, 'b', vm);
});
