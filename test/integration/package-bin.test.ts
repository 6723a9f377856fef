// The README's way to run Ferry as a package: `npm run build`, then `npx ferry ...` from the compiled
// dist/, and the agent as the systemd unit of examples/deploy runs it (`node dist/client/cli/main.js
// worker`), with no tsx anywhere: it starts its VM processes from compiled JavaScript and serves a VM.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { runCommand, startCommand, type LiveRun } from '../support/cli';
import { testVm, uniqueHosts } from '../support/cluster';
import { describeQemu, testQemuVm } from '../support/qemu';

jest.setTimeout(400_000);

const [HOST, QHOST] = uniqueHosts('pkg', 'pkgq');
const npx = (args: string[], env: Record<string, string> = {}) => runCommand('npx', ['--no-install', 'ferry', ...args], env, 120_000);

const homes: string[] = [];
const workers: LiveRun[] = [];

afterAll(async () => {
  for (const w of workers) {
    if (w.child.exitCode === null) {
      w.child.kill('SIGTERM');
      await w.exited;
    }
  }
  for (const home of homes) await fs.rm(home, { recursive: true, force: true });
});

/** The agent as the systemd unit starts it (npx would not pass a SIGTERM on to it), once it is ready. */
async function startAgent(host: string, extraEnv: Record<string, string> = {}): Promise<{ home: string; env: Record<string, string> }> {
  const home = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-pkg-'));
  homes.push(home);
  const env = { FERRY_DATA_SECRET: randomBytes(24).toString('hex'), FERRY_LOG_PRETTY: '0', ...extraEnv };
  const worker = startCommand(process.execPath, [path.join('dist', 'client', 'cli', 'main.js'), 'worker', '--host', host, '--home', home, '--data-listen', '127.0.0.1:0'], env);
  workers.push(worker);
  const ready = await worker.waitFor('stdout', /^.*"msg":"agent ready".*$/m);
  expect(JSON.parse(ready[0])).toMatchObject({ host, home });
  return { home, env };
}

it('npm run build, then npx ferry runs the compiled CLI, and the compiled agent serves a VM', async () => {
  const build = await runCommand('npm', ['run', 'build'], {}, 300_000);
  expect({ code: build.code, stderr: build.stderr }).toEqual({ code: 0, stderr: '' });

  const help = await npx(['--help']);
  expect(help.code).toBe(0);
  expect(help.stdout).toMatch(/^Usage: ferry /);

  await startAgent(HOST);

  const vm = testVm('randwrite', { diskBytes: 4 * 1024 * 1024, memoryBytes: 4 * 1024 * 1024, opsPerSecond: 200 });
  const created = await npx(['vm', 'create', vm.vmId, '--host', HOST, '--disk', '4MiB', '--memory', '4MiB', '--workload', 'randwrite', '--ops-per-second', '200', '--json']);
  expect({ code: created.code, stderr: created.stderr }).toEqual({ code: 0, stderr: '' });
  const listed = await npx(['vm', 'list', '--host', HOST]);
  expect(listed.stdout).toMatch(new RegExp(`${vm.vmId} +running`));
  expect((await npx(['vm', 'destroy', vm.vmId, '--host', HOST])).code).toBe(0);
});

describeQemu('the compiled package on QEMU', () => {
  // After the test above built dist/: the compiled agent finds the guest's sources in dist/ (its
  // initramfs is keyed by their hash) and boots a real guest.
  it('the compiled agent with FERRY_HYPERVISOR=qemu serves a QEMU VM', async () => {
    await startAgent(QHOST, { FERRY_HYPERVISOR: 'qemu' });
    const vm = testQemuVm();
    const created = await npx(['vm', 'create', vm.vmId, '--host', QHOST, '--disk', '64MiB', '--memory', '128MiB', '--workload', 'randwrite', '--ops-per-second', '200', '--json']);
    expect({ code: created.code, stderr: created.stderr }).toEqual({ code: 0, stderr: '' });
    const listed = await npx(['vm', 'list', '--host', QHOST]);
    expect(listed.stdout).toMatch(new RegExp(`${vm.vmId} +running`));
    expect((await npx(['vm', 'destroy', vm.vmId, '--host', QHOST])).code).toBe(0);
  });
});
