// Operator control of a migration on real agents: abort before and after the commit, a refused
// second migration, validation errors, and on-demand fetches during postcopy.
import { useCluster, testVm, expectGuestCorrect as guestCorrect, waitForProgress, type TestVm, uniqueHosts } from '../support/cluster';
import { FerryRequestError, MigrationAlreadyRunning, type FerryClient, type MigrationHandle } from '../../client/ferry-client';
import type { MigrationPhase } from '../../common/migration';
import { migrateIntoSlowPostcopy } from '../support/host-checks';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

const t = useCluster([a, b]);

function waitForPhase(handle: MigrationHandle, phases: MigrationPhase[], timeoutMs = 120_000): Promise<void> {
  return waitForProgress(handle, phases.join('/'), (p) => phases.includes(p.phase), timeoutMs);
}

async function expectOnlyOn(host: string, other: string, vmId: string): Promise<void> {
  expect((await t.cluster.vmProcesses(host)).map((p) => p.vmId)).toContain(vmId);
  expect((await t.cluster.vmProcesses(other)).map((p) => p.vmId)).not.toContain(vmId);
}

const expectGuestCorrect = (host: string, vm: TestVm) => guestCorrect(t.ferry, host, vm);

describe('abort', () => {
  it.each<[MigrationPhase]>([['disk-precopy'], ['memory-precopy'], ['awaiting-cutover']])(
    'in %s rolls back: the VM keeps running on the source with correct data, the destination is fenced',
    async (phase) => {
      const vm = testVm('randwrite', { opsPerSecond: 20, memoryBytes: 16 * 1024 * 1024 });
      await t.ferry.hostCommand(a, 'vmCreate', vm);
      const handle = await t.ferry.migrate({
        vmId: vm.vmId,
        sourceHost: a,
        destinationHosts: [b],
        cutover: phase === 'awaiting-cutover' ? 'manual' : 'auto',
        // slow enough that each phase lasts seconds
        bandwidthBytesPerSecond: phase === 'awaiting-cutover' ? null : 4 * 1024 * 1024,
      });
      await waitForPhase(handle, [phase]);
      await handle.abort(`test abort in ${phase}`);
      const report = await handle.result();
      expect(report.outcome).toBe('rolled-back');
      expect(report.reason).toContain(`test abort in ${phase}`);
      await expectOnlyOn(a, b, vm.vmId);
      const summary = await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId });
      expect(summary.state).toBe('running');
      expect(summary.ownership).toMatchObject({ state: 'running', epoch: 1 });
      await expectGuestCorrect(a, vm);
    },
  );

  it('leaves the VM free to migrate again to the same destination', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 200 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const first = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], cutover: 'manual' });
    await waitForPhase(first, ['awaiting-cutover']);
    await first.abort('changed my mind');
    expect((await first.result()).outcome).toBe('rolled-back');
    const again = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] });
    expect(await again.result()).toMatchObject({ outcome: 'completed', destinationHost: b, epoch: 2 });
    await expectGuestCorrect(b, vm);
  });

  it('after the commit is refused with the reason, and the migration completes', async () => {
    const vm = testVm('mixed', { opsPerSecond: 3000, memoryBytes: 2 * 1024 * 1024 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({
      vmId: vm.vmId,
      sourceHost: a,
      destinationHosts: [b],
      convergence: { maxRounds: 1, dirtyBlockThreshold: 1_000_000 },
      downtimeTargetMs: 10_000, // one memory round is enough: the slow part is the postcopy
    });
    await waitForPhase(handle, ['memory-precopy']);
    await handle.setBandwidth(2 * 1024 * 1024);
    await waitForPhase(handle, ['postcopy', 'finalizing', 'completed']);
    await expect(handle.abort('too late')).rejects.toThrow(/past the commit point|only before the switchover/);
    const report = await handle.result();
    expect(report.outcome).toBe('completed');
    await expectOnlyOn(b, a, vm.vmId);
    await expectGuestCorrect(b, vm);
  });
});

describe('postcopy', () => {
  /** A migration over a link of `bandwidth`: its postcopy push crawls. */
  async function slowPostcopy(vm: TestVm, bandwidth: number) {
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const report = await (await migrateIntoSlowPostcopy(t.ferry, vm.vmId, a, b, bandwidth, 'start')).result();
    expect(report).toMatchObject({ outcome: 'completed' });
    return { report, dest: await t.ferry.hostCommand(b, 'vmInspect', { vmId: vm.vmId }) };
  }

  it('serves guest reads of stale blocks by on-demand fetch, with correct data', async () => {
    const vm = testVm('mixed', { opsPerSecond: 4000, diskBytes: 8 * 1024 * 1024, memoryBytes: 2 * 1024 * 1024 });
    const { report } = await slowPostcopy(vm, 2 * 1024 * 1024);
    expect(report.onDemandFetches).toBeGreaterThan(0);
    expect(report.staleWaits.waits).toBeGreaterThan(0);
    expect(report.staleWaits.longestWaitMs).toBeGreaterThan(0);
    expect(report.staleWaits.totalWaitMs).toBeGreaterThanOrEqual(report.staleWaits.longestWaitMs);
    await expectGuestCorrect(b, vm);
  });

  it('at 1 MiB/s serves every stale read of the guest long before the push would reach its block', async () => {
    const vm = testVm('mixed', { opsPerSecond: 2000, diskBytes: 8 * 1024 * 1024, memoryBytes: 2 * 1024 * 1024 });
    const { report, dest } = await slowPostcopy(vm, 1024 * 1024);
    // The push of the stale blocks took seconds at 1 MiB/s, and the guest read stale blocks meanwhile.
    expect(report.postcopyMs).toBeGreaterThan(3000);
    expect(report.staleWaits.waits).toBeGreaterThan(5);
    expect(report.onDemandFetches).toBeGreaterThan(5);
    // A stale read waits a few round trips, not for the push; and the guest's longest gap between two
    // operations is its downtime (the last pages cross the slow link in the freeze) or such a wait.
    expect(report.staleWaits.longestWaitMs).toBeLessThan(report.postcopyMs / 4);
    expect(dest.guest!.maxGapMs).toBeLessThan(Math.max((report.downtimeMs ?? 0) + 1, report.postcopyMs / 4));
    await expectGuestCorrect(b, vm);
  });
});

describe('refusals', () => {
  it('refuses a second migration of a VM that is migrating', async () => {
    const vm = testVm('idle');
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], cutover: 'manual' });
    await expect(t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] })).rejects.toBeInstanceOf(MigrationAlreadyRunning);
    await handle.abort('test done');
    expect((await handle.result()).outcome).toBe('rolled-back');
  });

  async function refusal(input: Parameters<FerryClient['migrate']>[0]): Promise<FerryRequestError> {
    const handle = await t.ferry.migrate(input);
    const err = await handle.result().then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(FerryRequestError);
    return err as FerryRequestError;
  }

  it('refuses the same source and destination, naming the fix', async () => {
    const err = await refusal({ vmId: 'vm-same', sourceHost: a, destinationHosts: [a] });
    expect(err.type).toBe('ValidationError');
    expect(err.message).toMatch(/cannot migrate to the host it runs on/);
  });

  it('refuses a block size out of range', async () => {
    const err = await refusal({ vmId: 'vm-bs', sourceHost: a, destinationHosts: [b], blockBytes: 1000 });
    expect(err.type).toBe('ValidationError');
    expect(err.message).toMatch(/blockBytes/);
  });

  it('refuses an unknown VM', async () => {
    const err = await refusal({ vmId: 'no-such-vm', sourceHost: a, destinationHosts: [b] });
    expect(err.type).toBe('VmNotFound');
    expect(err.message).toMatch(new RegExp(`does not exist on host ${a}`));
  });

  it('refuses a VM that does not run on the named source', async () => {
    const vm = testVm('idle');
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const err = await refusal({ vmId: vm.vmId, sourceHost: b, destinationHosts: [a] });
    expect(err.type).toBe('VmNotFound');
    await t.ferry.hostCommand(a, 'vmDestroy', { vmId: vm.vmId });
  });

  it('rolls back from an unknown destination host (no agent) and says which', async () => {
    const vm = testVm('idle');
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: ['nowhere'], destinationDeadlineSeconds: 3 }, { checkHosts: false });
    const report = await handle.result();
    expect(report.outcome).toBe('rolled-back');
    expect(report.failedDestinations[0].reason).toMatch(/host nowhere did not answer.*ferry worker --host nowhere/);
    await expectOnlyOn(a, b, vm.vmId);
  });

  it('tries the next destination when the first cannot take the VM', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 300 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: ['nowhere', b], destinationDeadlineSeconds: 3 }, { checkHosts: false });
    const report = await handle.result();
    expect(report).toMatchObject({ outcome: 'completed', destinationHost: b });
    expect(report.failedDestinations.map((f) => f.host)).toEqual(['nowhere']);
    await expectOnlyOn(b, a, vm.vmId);
    await expectGuestCorrect(b, vm);
  });
});
