// `ferry resolve VM --destination-lost`: the operator's last word when the destination stops
// answering after the Final message left (the source waits, and must never guess). Refused in any
// other state; accepted, it is recorded in the history (who, when, why), fences the lost host's epoch
// and resumes the source; when the lost host comes back, its agent destroys its copy instead of
// running it.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { defaultPayloadConverter } from '@temporalio/common';
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import { ferry as runFerry } from '../support/cli';
import { agentLog, migrationIdOf, ownershipOn, shells, until, vmPid, within } from '../support/host-checks';
import { isAlive } from '../../harness/cluster';
import type { DestinationLostResolution } from '../../common/migration';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(300_000);

let faultDir = '';
const t = useCluster([a, b], { FERRY_RECONCILE_SECONDS: '2' }, async () => {
  faultDir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-resolve-'));
  return { hostEnv: (h: string): Record<string, string> => (h === b ? { FERRY_FAULT_POINTS_DIR: faultDir } : {}) };
});

afterAll(async () => {
  if (faultDir) await fs.rm(faultDir, { recursive: true, force: true });
});

it('is refused unless the migration waits for a destination lost after the Final message', async () => {
  const vm = testVm('idle', { diskBytes: 32 * 1024 * 1024 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  // Held before the switchover (an idle guest converges at once): it waits for an approval.
  const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], cutover: 'manual' });
  await waitForProgress(handle, 'the wait for approval', (p) => p.phase === 'awaiting-cutover');
  const refused = await runFerry(['resolve', vm.vmId, '--destination-lost', '--reason', 'just because']);
  expect({ code: refused.code, stderr: refused.stderr.trim() }).toEqual({ code: 4, stderr: expect.stringMatching(/^ferry: migration of .* is in phase (awaiting-cutover|converging) and does not wait for a lost destination/) });
  const noReason = await runFerry(['resolve', vm.vmId, '--destination-lost']);
  expect(noReason.code).toBe(2);
  await handle.abort('test over');
  expect((await handle.result()).outcome).toBe('rolled-back');
});

it('a destination lost after the Final message: the operator resumes the source, and the lost host destroys its copy when it returns', async () => {
  const vm = testVm('mixed', { opsPerSecond: 300 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  // The destination stops right after it committed, before it resumed the guest: then its host is lost.
  await fs.writeFile(path.join(faultDir, 'switchover-after-commit.arm'), '');
  const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] });
  await until('the destination to commit', () => fs.access(path.join(faultDir, 'switchover-after-commit.reached')).then(() => true, () => false));
  const lostCopy = await vmPid(t.cluster, b, vm.vmId);
  await t.cluster.killAgent(b);
  await fs.rm(path.join(faultDir, 'switchover-after-commit.arm'));

  await waitForProgress(handle, 'the switchover to wait for the lost destination', (p) => /waiting for destination .* ferry resolve .* --destination-lost/.test(p.message), 180_000);
  expect((await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).state).not.toBe('running'); // it never guesses

  const run = await runFerry(['resolve', vm.vmId, '--destination-lost', '--reason', `host ${b} is powered off`, '--json']);
  expect(run.code).toBe(0);
  expect(JSON.parse(run.stdout)).toMatchObject({ vmId: vm.vmId, accepted: true, host: b, epoch: 2 });
  const report = await within('the migration to end', 60_000, handle.result());
  expect(report).toMatchObject({
    outcome: 'rolled-back',
    reason: expect.stringMatching(new RegExp(`destination ${b} was declared lost by .+@.+ at .* \\(host ${b} is powered off\\)`)),
    resolution: { host: b, reason: `host ${b} is powered off`, by: expect.stringContaining('@'), at: expect.any(String) },
  });
  // Durably in the history: the accepted update with who and why.
  const history = await handle.workflow.fetchHistory();
  const accepted = (history.events ?? []).map((e) => e.workflowExecutionUpdateAcceptedEventAttributes).find((u) => u?.acceptedRequest?.input?.name === 'resolveDestinationLost');
  const args = accepted!.acceptedRequest!.input!.args!.payloads!.map((p) => defaultPayloadConverter.fromPayload(p as never)) as DestinationLostResolution[];
  expect(args[0]).toMatchObject({ reason: `host ${b} is powered off`, by: expect.stringContaining('@') });

  expect(await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).toMatchObject({ state: 'running', ownership: { state: 'running', epoch: 1 } });

  // The lost host comes back (its copy of the VM, committed but never resumed, is still there).
  expect(isAlive(lostCopy)).toBe(true);
  await t.cluster.startAgent(b);
  await until('the lost copy to be destroyed', async () => !isAlive(lostCopy) && (await shells(t.cluster, b, vm.vmId)).length === 0);
  expect(await ownershipOn(t.cluster, b, vm.vmId)).toMatchObject({ state: 'aborted', epoch: 2 });
  const id = await migrationIdOf(handle);
  const log = await agentLog(t.cluster, b, id);
  expect(log.some((l) => /^revoked:/.test(l.msg))).toBe(true);
  expect(log.some((l) => l.msg === 'committed VM resumed after an agent restart')).toBe(false);
  await expectGuestCorrect(t.ferry, a, vm);
});
