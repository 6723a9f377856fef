// Failures that no retry can heal surface, stop and roll back (issue #14), on real agents and VM
// processes: a destination with another data-plane secret, the source VM killed, a paused VM, a step
// that retries while the operator watches, a workflow terminated from the outside, and approve of an
// automatic cutover. Each migration must end within a bound, say why in `status --json` and in the
// agents' logs, leave the VM in a state that tells the truth, and leave nothing on the destination.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import { ferry as runFerry, type Run } from '../support/cli';
import { agentLog, descriptors, expectNothingLeftOn, migrationIdOf, ownershipOn, shells, tempFiles, until, vmPid, within } from '../support/host-checks';
import { FerryRequestError, type MigrationState } from '../../client/ferry-client';
import type { MigrationProgress, MigrationReport } from '../../common/migration';

const [a, b, stranger] = uniqueHosts('a', 'b', 'stranger');
const MiB = 1024 * 1024;
jest.setTimeout(300_000);

// `stranger` runs with a data-plane secret of its own; every agent reconciles every 2 s.
const strangerSecret = randomBytes(24).toString('hex');
const t = useCluster([a, b, stranger], { FERRY_RECONCILE_SECONDS: '2' }, { hostEnv: (h): Record<string, string> => (h === stranger ? { FERRY_DATA_SECRET: strangerSecret } : {}) });

const cli = (...args: string[]): Promise<Run> => runFerry(args);

function json<T>(run: Run): T {
  try {
    return JSON.parse(run.stdout) as T;
  } catch {
    throw new Error(`not JSON (exit ${run.code}): ${run.stdout}\n${run.stderr}`);
  }
}

/** Nothing of the VM on a host it does not run on: no shell, no process, no files. */
const nothingLeftOn = (host: string, vmId: string): Promise<void> => expectNothingLeftOn(t.cluster, host, vmId);

describe('a destination whose data-plane secret differs', () => {
  it('fails at once with the cause (no retries), is cleaned up, and the next destination takes the VM', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 200 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [stranger, b] });
    const report = await within('the migration to end', 120_000, handle.result());
    expect(report).toMatchObject({ outcome: 'completed', destinationHost: b });
    expect(report.failedDestinations).toEqual([{ host: stranger, reason: expect.stringMatching(/do not share the data-plane secret \(the server .* could not prove the shared secret/) }]);

    const status = json<MigrationState>(await cli('status', vm.vmId, '--json'));
    expect(status.report?.failedDestinations[0].reason).toMatch(/could not prove the shared secret/);
    const log = await agentLog(t.cluster, a, await migrationIdOf(handle));
    expect(log.some((l) => l.msg.startsWith('copyDiskFirstPass failed:') && /could not prove the shared secret/.test(l.msg))).toBe(true);
    expect(log.some((l) => /^retrying:/.test(l.msg))).toBe(false); // a refusal is an answer, not a retry

    await nothingLeftOn(stranger, vm.vmId);
    expect(await ownershipOn(t.cluster, stranger, vm.vmId)).toMatchObject({ state: 'aborted', epoch: 2 });
    await expectGuestCorrect(t.ferry, b, vm);
  });

  it('20 failed attempts leave the source agent with the descriptors and VM connections it had', async () => {
    const vm = testVm('idle', { diskBytes: 8 * MiB, memoryBytes: 2 * MiB });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const attempt = async (): Promise<void> => {
      const report = await within('a failed attempt to end', 120_000, (await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [stranger] })).result());
      expect(report.outcome).toBe('rolled-back');
      expect(report.failedDestinations[0].reason).toMatch(/could not prove the shared secret/);
    };
    await attempt(); // the first one opens what the agent keeps for good (its Temporal client, say)
    const agentPid = t.cluster.agents.get(a)!.process.pid!;
    const pid = await vmPid(t.cluster, a, vm.vmId);
    const before = { agent: await descriptors(agentPid), vm: await descriptors(pid) };
    for (let i = 0; i < 20; i++) await attempt();
    const now = async () => ({ agent: await descriptors(agentPid), vm: await descriptors(pid) });
    // Closing is asynchronous: wait until they are back (a leak never comes back), then compare.
    await until('the descriptors to be back to where they were', async () => JSON.stringify(await now()) === JSON.stringify(before), 30_000).catch(() => undefined);
    expect(await now()).toEqual(before);
    expect((await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
  });
});

describe('the source VM process dies', () => {
  it.each([
    ['disk', { diskBytes: 64 * MiB }, (p: MigrationProgress) => p.phase === 'disk-precopy' && p.disk.sentBytes > 4 * MiB],
    ['memory', { diskBytes: 4 * MiB, memoryBytes: 64 * MiB }, (p: MigrationProgress) => p.phase === 'memory-precopy' && p.memory.sentBytes > 4 * MiB],
  ] as const)('kill -9 during the %s precopy: the migration fails at once with the signal, the destination is cleaned, the VM is left crashed', async (what, size, under) => {
    const vm = testVm('randwrite', { opsPerSecond: 20, ...size });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 4 * MiB });
    await waitForProgress(handle, `the ${what} precopy under way`, under);
    process.kill(await vmPid(t.cluster, a, vm.vmId), 'SIGKILL');

    const err = await within('the migration to fail', 60_000, handle.result().then(() => null, (e: unknown) => e));
    expect(err).toBeInstanceOf(FerryRequestError);
    expect(err).toMatchObject({ type: 'VmCrashed', message: expect.stringMatching(/is crashed on .*killed by SIGKILL.*destination .* was fenced.*ferry vm start/) });

    const status = json<MigrationState>(await cli('status', vm.vmId, '--json'));
    expect(status).toMatchObject({ status: 'FAILED', error: { type: 'VmCrashed' }, progress: { phase: 'failed' } });
    expect(status.error?.message).toMatch(/SIGKILL/);
    const log = await agentLog(t.cluster, a, await migrationIdOf(handle));
    expect(log.some((l) => /died on host .*killed by SIGKILL/.test(l.msg))).toBe(true);

    const inspected = await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId });
    expect(inspected).toMatchObject({ state: 'crashed', pid: null, exit: { signal: 'SIGKILL' }, ownership: { state: 'running', epoch: 1 } });
    const list = await cli('vm', 'list', '--host', a);
    expect(list.stdout).toMatch(new RegExp(`${vm.vmId} +crashed \\(SIGKILL\\) +running@1 .* -\\n`));
    await nothingLeftOn(b, vm.vmId);
    expect(await ownershipOn(t.cluster, b, vm.vmId)).toMatchObject({ state: 'aborted', epoch: 2 });

    // Restarting is the operator's choice (a reboot of the guest).
    expect((await cli('vm', 'start', vm.vmId, '--host', a)).code).toBe(0);
    expect((await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
  });
});

describe('a paused VM', () => {
  it('migrates paused (a cold migration, reported as such); an abort leaves it paused', async () => {
    const vm = testVm('mixed', { opsPerSecond: 500 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await new Promise((r) => setTimeout(r, 500));
    expect(json<{ state: string }>(await cli('vm', 'pause', vm.vmId, '--host', a, '--json')).state).toBe('paused');
    const ops = (await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).guest!.ops;

    const first = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], cutover: 'manual' });
    await waitForProgress(first, 'awaiting the cutover', (p) => p.phase === 'awaiting-cutover');
    await first.abort('not now');
    expect(await first.result()).toMatchObject({ outcome: 'rolled-back', coldMigration: true });
    expect(await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).toMatchObject({ state: 'paused', guest: { ops } });

    const second = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] });
    expect(await second.result()).toMatchObject({ outcome: 'completed', coldMigration: true, destinationHost: b });
    expect((await cli('status', vm.vmId)).stdout).toMatch(/cold migration: the VM was paused and stays paused/);
    expect(await t.ferry.hostCommand(b, 'vmInspect', { vmId: vm.vmId })).toMatchObject({ state: 'paused', guest: { ops } });

    expect(json<{ state: string }>(await cli('vm', 'resume', vm.vmId, '--host', b, '--json')).state).toBe('running');
    const verify = await cli('vm', 'verify', vm.vmId, '--host', b, '--json');
    expect(verify.code).toBe(0);
    expect(json<{ violations: number; method: string }>(verify)).toMatchObject({ violations: 0, method: expect.stringMatching(/reference run/) });
  });
});

describe('a step that retries', () => {
  it('is shown as retrying (cause, attempt, since) in status, the Web UI details and the agent log; an abort ends it in seconds', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 50, diskBytes: 64 * MiB });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 2 * MiB, destinationDeadlineSeconds: 600 });
    await waitForProgress(handle, 'the disk precopy under way', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 2 * MiB);
    await t.cluster.killAgent(b);
    try {
      const seen: { state: MigrationState | null } = { state: null };
      await until('status --json to show the retry', async () => {
        seen.state = json<MigrationState>(await cli('status', vm.vmId, '--json'));
        return (seen.state.progress?.retrying ?? null) !== null;
      });
      const retrying = seen.state!.progress!.retrying!;
      expect(retrying).toMatchObject({ step: 'copyDiskFirstPass', cause: expect.stringMatching(/data plane/), attempt: expect.any(Number) });
      expect(retrying.sinceMs).toBeLessThanOrEqual(Date.now());
      expect((await cli('status', vm.vmId)).stdout).toMatch(/retrying: .*\(attempt \d+, since \d{4}-\d\d-\d\dT/);
      await until('the Web UI current details to show the retry', async () => {
        const meta = (await handle.workflow.query('__temporal_workflow_metadata')) as { currentDetails?: string };
        return /retrying: .*\(attempt \d+, since/.test(meta.currentDetails ?? '');
      });
      const log = await agentLog(t.cluster, a, await migrationIdOf(handle));
      expect(log.some((l) => /^retrying: .*\(attempt \d+, since/.test(l.msg) && l.vmId === vm.vmId)).toBe(true);

      await handle.abort('destination down');
      const report = await within('the abort to end the migration', 60_000, handle.result());
      expect(report).toMatchObject({ outcome: 'rolled-back', reason: 'destination down' });
      expect((await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
    } finally {
      await t.cluster.startAgent(b);
    }
    // The fence that could not reach b then reaches it now.
    await until('the shell on b to be fenced and removed', async () => (await shells(t.cluster, b, vm.vmId)).length === 0);
    expect(await ownershipOn(t.cluster, b, vm.vmId)).toMatchObject({ state: 'aborted' });
  });
});

describe('no orphans', () => {
  it('a shell whose workflow was terminated from outside is fenced and removed; stale temp files go', async () => {
    const stale = path.join(t.cluster.home(b), 'ownership', '.someone.json.4242.1700000000000.tmp');
    await fs.mkdir(path.dirname(stale), { recursive: true });
    await fs.writeFile(stale, '');
    await fs.utimes(stale, new Date(Date.now() - 3_600_000), new Date(Date.now() - 3_600_000));
    const vm = testVm('mixed', { opsPerSecond: 200, diskBytes: 32 * MiB });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 2 * MiB });
    await waitForProgress(handle, 'the disk precopy under way', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 0);
    expect(await shells(t.cluster, b, vm.vmId)).toHaveLength(1);
    await handle.workflow.terminate('terminated from the Web UI');

    await until('the orphaned shell to be removed', async () => (await shells(t.cluster, b, vm.vmId)).length === 0, 60_000);
    await until('its VM process to be gone', async () => !(await t.cluster.vmProcesses(b)).some((p) => p.vmId === vm.vmId), 60_000);
    expect(await ownershipOn(t.cluster, b, vm.vmId)).toMatchObject({ state: 'aborted', epoch: 2 });
    expect(await tempFiles(t.cluster, b)).toEqual([]);
    expect((await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
    await expectGuestCorrect(t.ferry, a, vm);
  });
});

describe('operator requests', () => {
  it('approve of a migration with automatic cutover is refused with the reason', async () => {
    const vm = testVm('idle', { diskBytes: 32 * MiB });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 2 * MiB });
    await waitForProgress(handle, 'the disk precopy', (p) => p.phase === 'disk-precopy');
    const run = await cli('approve', vm.vmId);
    expect({ code: run.code, stderr: run.stderr.trim() }).toEqual({ code: 4, stderr: expect.stringMatching(/^ferry: migration of .* switches over on its own \(cutover auto\): there is nothing to approve/) });
    await handle.abort('test over');
    expect((await handle.result()).outcome).toBe('rolled-back');
  });

  it('diskRounds counts every dirty round that was sent; the report has the block size, the text the incremental decision', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 1000, diskBytes: 64 * MiB });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], blockBytes: MiB, cutover: 'manual' });
    await waitForProgress(handle, 'awaiting the cutover', (p) => p.phase === 'awaiting-cutover');
    await new Promise((r) => setTimeout(r, 6000)); // at least one disk round while it waits
    await handle.approveCutover();
    const report: MigrationReport = await handle.result();
    const history = await handle.workflow.fetchHistory();
    const dirtyRounds = (history.events ?? []).filter((e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'copyDiskDirty').length;
    expect(report).toMatchObject({ outcome: 'completed', blockBytes: MiB, diskRounds: dirtyRounds });
    expect(dirtyRounds).toBeGreaterThan(1);
    const text = (await cli('status', vm.vmId)).stdout;
    expect(text).toMatch(/full copy: the source has no write-tracking bitmap for VM .*, block size 1\.0 MiB/);
    await expectGuestCorrect(t.ferry, b, vm);
  });
});
