// Admission: agents bound how many migrations touch their host at once (and the cluster caps the
// total). Real agents with a limit of one slot per host; migrations wait, then complete.
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import type { FerryClient, MigrationHandle } from '../../client/ferry-client';

const [a, b, c] = uniqueHosts('a', 'b', 'c');
jest.setTimeout(300_000);

const t = useCluster([a, b, c], { FERRY_MAX_MIGRATIONS: '1' });

const SLOW = 2 * 1024 * 1024; // bytes/s: the first migration holds its slots for seconds

async function vmOn(host: string, workload: 'randwrite' | 'mixed' = 'randwrite') {
  const vm = testVm(workload, { opsPerSecond: 50, diskBytes: 16 * 1024 * 1024 });
  await t.ferry.hostCommand(host, 'vmCreate', vm);
  return vm;
}

function holders(state: Awaited<ReturnType<FerryClient['slots']>>): string[] {
  return (state?.holders ?? []).map((h) => h.holder.workflowId);
}

it('a second migration to a full host waits for the slot, then completes; the slot is never shared', async () => {
  const vm1 = await vmOn(a);
  const vm2 = await vmOn(c);
  const m1 = await t.ferry.migrate({ vmId: vm1.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: SLOW });
  await waitForProgress(m1, 'first migration copying', (p) => p.phase === 'disk-precopy');
  const m2 = await t.ferry.migrate({ vmId: vm2.vmId, sourceHost: c, destinationHosts: [b] });
  await waitForProgress(m2, 'second migration waiting', (p) => p.phase === 'waiting-for-slot');
  expect((await m2.progress()).message).toContain(`host-${b}`);

  const slotsOfB = await t.ferry.slots(b);
  expect(holders(slotsOfB)).toEqual([`migrate-${vm1.vmId}`]);
  expect(slotsOfB!.waiting.map((w) => w.holder.workflowId)).toEqual([`migrate-${vm2.vmId}`]);
  expect(slotsOfB!.limit).toBe(1);

  await m1.setBandwidth(null);
  expect((await m1.result()).outcome).toBe('completed');
  expect((await m2.result()).outcome).toBe('completed');
  expect(holders(await t.ferry.slots(b))).toEqual([]);
  // Other test files share the server and its cluster-wide slots: only ours must be back.
  const clusterWide = holders(await t.ferry.slots(null));
  expect(clusterWide).not.toContain(`migrate-${vm1.vmId}`);
  expect(clusterWide).not.toContain(`migrate-${vm2.vmId}`);
  await expectGuestCorrect(t.ferry, b, vm1);
  await expectGuestCorrect(t.ferry, b, vm2);
});

it('migrations in opposite directions between two one-slot hosts do not deadlock', async () => {
  const there = await vmOn(a, 'mixed');
  const back = await vmOn(b, 'mixed');
  const handles: MigrationHandle[] = await Promise.all([
    t.ferry.migrate({ vmId: there.vmId, sourceHost: a, destinationHosts: [b] }),
    t.ferry.migrate({ vmId: back.vmId, sourceHost: b, destinationHosts: [a] }),
  ]);
  const reports = await Promise.all(handles.map((h) => h.result()));
  expect(reports.map((r) => r.outcome)).toEqual(['completed', 'completed']);
  await expectGuestCorrect(t.ferry, b, there);
  await expectGuestCorrect(t.ferry, a, back);
});

it('an abort while waiting withdraws the request; the VM runs on where it was', async () => {
  const holder = await vmOn(a);
  const waiter = await vmOn(c);
  const m1 = await t.ferry.migrate({ vmId: holder.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: SLOW });
  await waitForProgress(m1, 'first migration copying', (p) => p.phase === 'disk-precopy');
  const m2 = await t.ferry.migrate({ vmId: waiter.vmId, sourceHost: c, destinationHosts: [b] });
  await waitForProgress(m2, 'second migration waiting', (p) => p.phase === 'waiting-for-slot');
  await m2.abort('test: no longer needed');
  const r2 = await m2.result();
  expect(r2.outcome).toBe('rolled-back');
  expect((await t.ferry.slots(b))!.waiting).toEqual([]);
  await m1.setBandwidth(null);
  expect((await m1.result()).outcome).toBe('completed');
  await expectGuestCorrect(t.ferry, c, waiter);
});

it('the slot of a migration that was terminated is reclaimed for the next one', async () => {
  const stuck = await vmOn(a);
  const next = await vmOn(c);
  const m1 = await t.ferry.migrate({ vmId: stuck.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 256 * 1024 });
  await waitForProgress(m1, 'first migration copying', (p) => p.phase === 'disk-precopy');
  const m2 = await t.ferry.migrate({ vmId: next.vmId, sourceHost: c, destinationHosts: [b] });
  await waitForProgress(m2, 'second migration waiting', (p) => p.phase === 'waiting-for-slot');
  // An operator terminates the first run from the Temporal UI: it never releases its slots.
  await t.ferry.temporal.workflow.getHandle(`migrate-${stuck.vmId}`).terminate('test: terminated by an operator');
  expect((await m2.result()).outcome).toBe('completed');
  await expectGuestCorrect(t.ferry, b, next);
});
