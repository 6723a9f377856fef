// examples/migrate.ts, the README's ten-line program, run as a platform team would run it.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { startCluster, testVm } from '../support/cluster';
import { testTemporalAddress } from '../support/temporal';
import type { LocalCluster } from '../../harness/cluster';
import type { FerryClient } from '../../client/ferry-client';

jest.setTimeout(120_000);

const REPO = path.resolve(__dirname, '..', '..');

function example(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'examples/migrate.ts', ...args], {
      cwd: REPO,
      env: { ...process.env, TEMPORAL_ADDRESS: testTemporalAddress(), TEMPORAL_NAMESPACE: 'default', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 100_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

let cluster: LocalCluster;
let ferry: FerryClient;

beforeAll(async () => {
  ({ cluster, ferry } = await startCluster(['a', 'b']));
});

afterAll(async () => {
  await cluster?.stop();
});

it('migrates a VM, printing progress and the report', async () => {
  // Slow enough that the program sees the migration in progress more than once.
  const vm = testVm('randwrite', { opsPerSecond: 300, diskBytes: 64 * 1024 * 1024 });
  await ferry.hostCommand('a', 'vmCreate', vm);
  const run = await example([vm.vmId, 'a', 'b']);
  expect(run.stderr).toBe('');
  expect(run.code).toBe(0);
  const progressLines = run.stdout.split('\n').filter((l) => /^[a-z-]+ \d+%: /.test(l));
  expect(progressLines.length).toBeGreaterThanOrEqual(2);
  expect(run.stdout).toMatch(new RegExp(`\\n${vm.vmId}: completed\\n  a → b  mode tpm`));
  expect((await ferry.hostCommand('b', 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
  expect((await cluster.vmProcesses('a')).map((p) => p.vmId)).not.toContain(vm.vmId);

  // The same program, configured from the environment, moves it back.
  const back = await example([], { FERRY_VM: vm.vmId, FERRY_FROM: 'b', FERRY_TO: 'a' });
  expect(back.code).toBe(0);
  expect(back.stdout).toContain(`${vm.vmId}: completed`);
  expect((await ferry.hostCommand('a', 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
});

it('fails with a typed error a person can act on', async () => {
  const unknown = await example(['no-such-vm', 'a', 'b']);
  expect(unknown.code).toBe(1);
  expect(unknown.stderr).toMatch(/^VmNotFound: VM no-such-vm does not exist on host a/);

  const noAgent = await example(['no-such-vm', 'a', 'nowhere']);
  expect(noAgent.code).toBe(1);
  expect(noAgent.stderr).toMatch(/^HostUnavailable: no agent is polling task queue host-nowhere/);

  const usage = await example([]);
  expect(usage.code).toBe(2);
  expect(usage.stderr).toMatch(/^usage: /);
});
