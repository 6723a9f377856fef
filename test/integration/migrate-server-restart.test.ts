// The Temporal server is killed (SIGKILL) in the middle of a migration and started again on the same
// SQLite file: the workflow continues from its history and completes with correct data.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { ensureTemporalCli, startDevServer, freePort, type DevServer } from '../../scripts/temporal-cli';
import { LocalCluster } from '../../harness/cluster';
import { FerryClient } from '../../client/ferry-client';
import { testVm, expectGuestCorrect } from '../support/cluster';

jest.setTimeout(300_000);

let dir: string;
let server: DevServer | null = null;
let cluster: LocalCluster | null = null;

afterAll(async () => {
  await cluster?.stop();
  await server?.stop();
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

it('a migration survives a kill -9 and restart of the Temporal server', async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-restart-'));
  const cli = await ensureTemporalCli();
  const dbFile = path.join(dir, 'temporal.db');
  const port = await freePort();
  server = await startDevServer({ cliPath: cli.path, dbFile, port, uiPort: null });
  cluster = await LocalCluster.start({ temporalAddress: server.address, hosts: ['a', 'b'], root: dir });
  const ferry = new FerryClient(cluster.client);

  const vm = testVm('randwrite', { opsPerSecond: 30, diskBytes: 48 * 1024 * 1024 });
  await ferry.hostCommand('a', 'vmCreate', vm);
  const handle = await ferry.migrate({ vmId: vm.vmId, sourceHost: 'a', destinationHosts: ['b'], bandwidthBytesPerSecond: 6 * 1024 * 1024 });
  for (;;) {
    const p = await handle.progress();
    if (p.phase === 'disk-precopy' || p.phase === 'disk-dirty-rounds') break;
    await new Promise((r) => setTimeout(r, 200));
  }

  process.kill(server.pid, 'SIGKILL');
  await server.exited;
  await new Promise((r) => setTimeout(r, 2000));
  server = await startDevServer({ cliPath: cli.path, dbFile, port, uiPort: null });

  const report = await handle.result();
  expect(report.outcome).toBe('completed');
  expect((await cluster.vmProcesses('a')).map((p) => p.vmId)).not.toContain(vm.vmId);
  expect((await cluster.vmProcesses('b')).map((p) => p.vmId)).toContain(vm.vmId);
  await expectGuestCorrect(ferry, 'b', vm);
});
