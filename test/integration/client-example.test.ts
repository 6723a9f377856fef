// examples/migrate.ts, the README's ten-line program, run as a platform team would run it.
import { useCluster, testVm, uniqueHosts } from '../support/cluster';
import { runScript, type Run } from '../support/cli';

jest.setTimeout(400_000);

const example = (args: string[], env: Record<string, string> = {}): Promise<Run> => runScript('examples/migrate.ts', args, env, 180_000);

const [A, B] = uniqueHosts('a', 'b');
const t = useCluster([A, B]);

it('migrates a VM, printing progress and the report', async () => {
  // Slow enough that the program sees the migration in progress more than once.
  const vm = testVm('randwrite', { opsPerSecond: 100, diskBytes: 64 * 1024 * 1024 });
  await t.ferry.hostCommand(A, 'vmCreate', vm);
  const run = await example([vm.vmId, A, B]);
  expect(run.stderr).toBe('');
  expect(run.code).toBe(0);
  const progressLines = run.stdout.split('\n').filter((l) => /^[a-z-]+ \d+%: /.test(l));
  expect(progressLines.length).toBeGreaterThanOrEqual(2);
  expect(run.stdout).toMatch(new RegExp(`\\n${vm.vmId}: completed\\n  ${A} → ${B}  mode tpm`));
  expect((await t.ferry.hostCommand(B, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
  expect((await t.cluster.vmProcesses(A)).map((p) => p.vmId)).not.toContain(vm.vmId);

  // The same program, configured from the environment, moves it back.
  const back = await example([], { FERRY_VM: vm.vmId, FERRY_FROM: B, FERRY_TO: A });
  expect(back.code).toBe(0);
  expect(back.stdout).toContain(`${vm.vmId}: completed`);
  expect((await t.ferry.hostCommand(A, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
});

it('fails with a typed error a person can act on', async () => {
  const vmId = `no-such-vm-${process.pid}`;
  const unknown = await example([vmId, A, B]);
  expect(unknown.code).toBe(1);
  expect(unknown.stderr).toMatch(new RegExp(`^VmNotFound: VM ${vmId} does not exist on host ${A}`));

  const noAgent = await example([vmId, A, 'nowhere']);
  expect(noAgent.code).toBe(1);
  expect(noAgent.stderr).toMatch(/^HostUnavailable: no agent is polling task queue host-nowhere/);

  const usage = await example([]);
  expect(usage.code).toBe(2);
  expect(usage.stderr).toMatch(/^usage: /);
});
