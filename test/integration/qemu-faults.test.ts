// Faults during migrations of real QEMU guests: an abort and a kill -9 of the source's QEMU during the
// memory precopy (QEMU's own stream), the source's agent killed and restarted during the disk and the
// memory precopy, and the destination's agent during the postcopy. Each ends as the simulator's cells
// do: rolled back with the guest running clean on the source, failed as VmCrashed, or completed with
// the guest clean on the destination.
import { useCluster, uniqueHosts, waitForProgress } from '../support/cluster';
import { describeQemu, testQemuVm } from '../support/qemu';
import { expectNothingLeftOn, guestWorking, migrateIntoSlowPostcopy, ownershipOn, vmPid, within } from '../support/host-checks';
import { FerryRequestError, type MigrationHandle } from '../../client/ferry-client';
import type { MigrationProgress } from '../../common/migration';

const [a, b] = uniqueHosts('qfa', 'qfb');
const MiB = 1024 * 1024;
jest.setTimeout(600_000);

describeQemu('QEMU guests under faults', () => {
  const t = useCluster([a, b], { FERRY_HYPERVISOR: 'qemu' });

  async function verifiedOn(host: string, vmId: string): Promise<void> {
    const verified = await t.ferry.hostCommand(host, 'vmVerify', { vmId });
    expect({ violations: verified.violations }).toEqual({ violations: 0 });
  }

  // Each case's VM and the progress that means the migration is well into that phase. The memory cases
  // reach the memory precopy at once: a small disk, and a guest that writes little of it.
  const PHASES = {
    disk: { size: { diskBytes: 64 * MiB }, under: (p: MigrationProgress) => p.phase === 'disk-precopy' && p.disk.sentBytes > 4 * MiB },
    memory: { size: { diskBytes: 8 * MiB, opsPerSecond: 20 }, under: (p: MigrationProgress) => p.phase === 'memory-precopy' && p.memory.sentBytes > 4 * MiB },
  } as const;

  /** A VM whose guest works on a, migrating to b at 4 MiB/s, well into the `what` precopy. */
  async function migratingIn(what: keyof typeof PHASES): Promise<{ vm: ReturnType<typeof testQemuVm>; handle: MigrationHandle }> {
    const vm = testQemuVm(PHASES[what].size);
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await guestWorking(t.ferry, a, vm.vmId);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 4 * MiB });
    await waitForProgress(handle, `the ${what} precopy`, PHASES[what].under);
    return { vm, handle };
  }

  // The disk phases of an abort and a QEMU crash run Ferry's own code (the simulator's cells cover them);
  // the memory precopy is QEMU's stream.
  it('an abort during the memory precopy rolls back: the guest runs on the source and verifies clean, nothing is left on the destination', async () => {
    const { vm, handle } = await migratingIn('memory');
    await handle.abort('test: abort');
    expect(await within('the rollback', 120_000, handle.result())).toMatchObject({ outcome: 'rolled-back' });
    expect((await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
    await expectNothingLeftOn(t.cluster, b, vm.vmId);
    await guestWorking(t.ferry, a, vm.vmId);
    await verifiedOn(a, vm.vmId);
    await t.ferry.hostCommand(a, 'vmDestroy', { vmId: vm.vmId });
  });

  it('kill -9 of QEMU during the memory precopy: VmCrashed with the signal, the destination is cleaned, the VM is left crashed', async () => {
    const { vm, handle } = await migratingIn('memory');
    process.kill(await vmPid(t.cluster, a, vm.vmId), 'SIGKILL');
    const err = await within('the migration to fail', 120_000, handle.result().then(() => null, (e: unknown) => e));
    expect(err).toBeInstanceOf(FerryRequestError);
    expect(err).toMatchObject({ type: 'VmCrashed', message: expect.stringMatching(/is crashed on .*killed by SIGKILL.*ferry vm start/) });
    expect(await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).toMatchObject({ state: 'crashed', exit: { signal: 'SIGKILL' }, ownership: { state: 'running', epoch: 1 } });
    await expectNothingLeftOn(t.cluster, b, vm.vmId);
    expect(await ownershipOn(t.cluster, b, vm.vmId)).toMatchObject({ state: 'aborted', epoch: 2 });
    await t.ferry.hostCommand(a, 'vmDestroy', { vmId: vm.vmId });
  });

  it.each(['disk', 'memory'] as const)('kill -9 of the source agent during the %s precopy: the restarted agent carries on, the migration completes and the guest verifies clean', async (what) => {
    const { vm, handle } = await migratingIn(what);
    await t.cluster.killAgent(a, 'SIGKILL');
    await t.cluster.startAgent(a);
    await handle.setBandwidth(null);
    const report = await within('the migration to complete', 300_000, handle.result());
    expect(report).toMatchObject({ outcome: 'completed', destinationHost: b });
    if (what === 'disk') expect(report.diskPrecopyResumedFromBlock).toBeGreaterThan(0);
    expect((await t.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
    await guestWorking(t.ferry, b, vm.vmId);
    await verifiedOn(b, vm.vmId);
    await t.ferry.hostCommand(b, 'vmDestroy', { vmId: vm.vmId });
  });

  it('kill -9 of the destination agent during the postcopy: the restarted agent takes the stale blocks over, the migration completes and the guest verifies clean', async () => {
    const vm = testQemuVm({ workload: 'mixed', diskBytes: 16 * MiB });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await guestWorking(t.ferry, a, vm.vmId);
    const handle = await migrateIntoSlowPostcopy(t.ferry, vm.vmId, a, b, MiB, 'memory-precopy');
    await waitForProgress(handle, 'the postcopy', (p) => p.phase === 'postcopy', 300_000);
    await handle.setBandwidth(64 * 1024); // holds the push in the postcopy while the agent is down
    const killedAt = Date.now();
    await t.cluster.killAgent(b, 'SIGKILL');
    await t.cluster.startAgent(b);
    const downMs = Date.now() - killedAt;
    await handle.setBandwidth(null);
    const report = await within('the migration to complete', 300_000, handle.result());
    expect(report).toMatchObject({ outcome: 'completed', destinationHost: b });
    expect(report.postcopyMs).toBeGreaterThan(downMs); // measured by the destination across its restart
    expect((await t.cluster.vmProcesses(a)).map((p) => p.vmId)).not.toContain(vm.vmId);
    await guestWorking(t.ferry, b, vm.vmId);
    await verifiedOn(b, vm.vmId);
    await t.ferry.hostCommand(b, 'vmDestroy', { vmId: vm.vmId });
  });
});
