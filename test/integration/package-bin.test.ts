// The README's way to run Ferry as a package: `npm run build`, then `npx ferry ...` from the compiled
// dist/, and the agent as the systemd unit of examples/deploy runs it (`node dist/client/cli/main.js
// worker`), with no tsx anywhere: it starts its VM processes from compiled JavaScript and serves a VM.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { runCommand, startCommand, type LiveRun } from '../support/cli';
import { testVm, uniqueHosts } from '../support/cluster';

jest.setTimeout(400_000);

const [HOST] = uniqueHosts('pkg');
const npx = (args: string[], env: Record<string, string> = {}) => runCommand('npx', ['--no-install', 'ferry', ...args], env, 120_000);

let home: string | null = null;
let worker: LiveRun | null = null;

afterAll(async () => {
  if (worker && worker.child.exitCode === null) {
    worker.child.kill('SIGTERM');
    await worker.exited;
  }
  if (home) await fs.rm(home, { recursive: true, force: true });
});

it('npm run build, then npx ferry runs the compiled CLI, and the compiled agent serves a VM', async () => {
  const build = await runCommand('npm', ['run', 'build'], {}, 300_000);
  expect({ code: build.code, stderr: build.stderr }).toEqual({ code: 0, stderr: '' });

  const help = await npx(['--help']);
  expect(help.code).toBe(0);
  expect(help.stdout).toMatch(/^Usage: ferry /);

  home = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-pkg-'));
  const env = { FERRY_DATA_SECRET: randomBytes(24).toString('hex'), FERRY_LOG_PRETTY: '0' };
  // The agent as the systemd unit starts it (npx would not pass a SIGTERM on to it).
  worker = startCommand(process.execPath, [path.join('dist', 'client', 'cli', 'main.js'), 'worker', '--host', HOST, '--home', home, '--data-listen', '127.0.0.1:0'], env);
  const ready = await worker.waitFor('stdout', /^.*"msg":"agent ready".*$/m);
  expect(JSON.parse(ready[0])).toMatchObject({ host: HOST, home });

  const vm = testVm('randwrite', { diskBytes: 4 * 1024 * 1024, memoryBytes: 4 * 1024 * 1024, opsPerSecond: 200 });
  const created = await npx(['vm', 'create', vm.vmId, '--host', HOST, '--disk', '4MiB', '--memory', '4MiB', '--workload', 'randwrite', '--ops-per-second', '200', '--json']);
  expect({ code: created.code, stderr: created.stderr }).toEqual({ code: 0, stderr: '' });
  const listed = await npx(['vm', 'list', '--host', HOST]);
  expect(listed.stdout).toMatch(new RegExp(`${vm.vmId} +running`));
  expect((await npx(['vm', 'destroy', vm.vmId, '--host', HOST])).code).toBe(0);
});
