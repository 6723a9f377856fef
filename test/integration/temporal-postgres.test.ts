// The production Temporal server (go.temporal.io/server on PostgreSQL, SQL visibility) in a network
// namespace of its own, with the agents in theirs: a normal migration, a kill -9 of the server in the
// middle of one (restarted on the same database), and a PostgreSQL restart in the middle of another.
// The server is built from source on first use (npm run setup:temporal-server; global setup starts it
// in the background and this file runs last).
import { NetCluster } from '../../harness/net-cluster';
import { testVm, expectGuestCorrect, waitForProgress, type TestVm } from '../support/cluster';
import { describeNetns } from '../support/netns';
import { SearchAttributes } from '../../workflows/definitions';

jest.setTimeout(300_000);

const [a, b] = ['pg-a', 'pg-b'];

describeNetns('the production Temporal server on PostgreSQL', () => {
  let net: NetCluster | null = null;

  beforeAll(async () => {
    net = await NetCluster.start({ hosts: [a, b], server: 'postgres', log: (line) => process.stderr.write(`[temporal-postgres] ${line}\n`) });
  }, 30 * 60_000); // a cold build of the server waits here

  afterAll(async () => {
    if (net) expect(await net.stop()).toEqual([]);
  });

  async function migrate(vm: TestVm, during?: (n: NetCluster) => Promise<void>) {
    const n = net!;
    await n.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await n.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: during ? 4 * 1024 * 1024 : null });
    if (during) {
      await waitForProgress(handle, 'the disk precopy', (p) => p.phase === 'disk-precopy' || p.phase === 'disk-dirty-rounds');
      await during(n);
      await handle.setBandwidth(null);
    }
    const report = await handle.result();
    expect(report.outcome).toBe('completed');
    expect((await n.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
    await expectGuestCorrect(n.ferry, b, vm);
    return handle;
  }

  it('runs a migration, and finds it by its search attributes (SQL visibility)', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 200 });
    const handle = await migrate(vm);
    const found: string[] = [];
    for (let i = 0; i < 60 && found.length === 0; i++) {
      for await (const w of net!.cluster.client.workflow.list({ query: `${SearchAttributes.vmId.name} = '${vm.vmId}' AND ${SearchAttributes.outcome.name} = 'completed'` })) found.push(w.workflowId);
      if (found.length === 0) await new Promise((r) => setTimeout(r, 500));
    }
    expect(found).toEqual([handle.workflowId]);
  });

  it('survives a kill -9 of the server in the middle of a migration (restarted on the same database)', async () => {
    await migrate(testVm('mixed', { opsPerSecond: 200, diskBytes: 48 * 1024 * 1024 }), async (n) => {
      await n.temporal.restart(2000);
    });
  });

  it('survives a PostgreSQL restart in the middle of a migration', async () => {
    await migrate(testVm('mixed', { opsPerSecond: 200, diskBytes: 48 * 1024 * 1024 }), async (n) => {
      await n.postgres!.restart();
    });
  });
});
