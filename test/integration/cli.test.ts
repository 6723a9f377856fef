// The `ferry` CLI as people and scripts run it: a child process against the test server and real agents.
import { startCluster, testVm, uniqueHosts, waitForProgress } from '../support/cluster';
import { ferry as runFerry, inBatches, startFerry, type Run } from '../support/cli';
import type { LocalCluster } from '../../harness/cluster';
import type { FerryClient } from '../../client/ferry-client';
import type { MigrationReport } from '../../common/migration';
import { migrationQuery } from '../../client/ferry-client';
import { resolveConnection } from '../../client/connection';
import { parseRate, parseSize } from '../../client/cli/units';
import { DEFAULT_OPS_PER_SECOND } from '../../common/types';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from '../../scripts/temporal-cli';

jest.setTimeout(120_000);

const ferry = (...args: string[]): Promise<Run> => runFerry(args);

/** The exit code, with the output in the failure message when it is not the expected one. */
function exitOf(run: Run): number | string {
  return run.code === 0 || run.code === null ? (run.code ?? 'killed') : `${run.code}\n--- stdout\n${run.stdout}\n--- stderr\n${run.stderr}`;
}

function json<T>(run: Run): T {
  try {
    return JSON.parse(run.stdout) as T;
  } catch {
    throw new Error(`not JSON (exit ${run.code}): ${run.stdout}\n${run.stderr}`);
  }
}

describe('parsing, in process', () => {
  it('reads sizes and rates as people type them', () => {
    expect(['1GiB', '256MiB', '64KiB', '1G', '1GB', '4096'].map(parseSize)).toEqual([2 ** 30, 256 * 2 ** 20, 65536, 2 ** 30, 1e9, 4096]);
    expect(['100MiB/s', '1Gbit/s', '100Mbps', '10MB/s', 'unlimited'].map(parseRate)).toEqual([100 * 2 ** 20, 125e6, 12.5e6, 1e7, null]);
    expect(() => parseSize('12XB')).toThrow(/expected a size/);
    expect(() => parseRate('0')).toThrow(/not a positive rate/);
  });

  it('quotes visibility query values', () => {
    expect(migrationQuery({ vmId: "x' OR 'a'='a", running: true })).toBe("WorkflowType = 'migrateVm' AND FerryVmId = 'x\\' OR \\'a\\'=\\'a' AND ExecutionStatus = 'Running'");
    expect(migrationQuery({ sourceHost: 'a\\', phase: 'postcopy' })).toBe("WorkflowType = 'migrateVm' AND FerrySourceHost = 'a\\\\' AND FerryPhase = 'postcopy'");
  });

  it('takes connection settings from arguments, then TEMPORAL_* variables', () => {
    expect(resolveConnection({ env: {} })).toEqual({ address: 'localhost:7233', namespace: 'default', taskQueue: 'ferry-migrations', apiKey: undefined, tls: undefined });
    expect(resolveConnection({ env: { TEMPORAL_ADDRESS: 'h:1', TEMPORAL_NAMESPACE: 'ns', TEMPORAL_API_KEY: 'k', FERRY_TASK_QUEUE: 'staging' } })).toEqual({ address: 'h:1', namespace: 'ns', taskQueue: 'staging', apiKey: 'k', tls: undefined });
    expect(resolveConnection({ taskQueue: 'canary', env: { FERRY_TASK_QUEUE: 'staging' } }).taskQueue).toBe('canary');
    expect(resolveConnection({ address: 'x:2', env: { TEMPORAL_ADDRESS: 'h:1', TEMPORAL_TLS: 'true', TEMPORAL_TLS_SERVER_NAME: 'srv' } })).toMatchObject({ address: 'x:2', tls: { serverNameOverride: 'srv' } });
    expect(resolveConnection({ tls: false, env: { TEMPORAL_TLS: 'true' } }).tls).toBe(false);
    expect(() => resolveConnection({ env: { TEMPORAL_TLS_CLIENT_CERT_PATH: '/c.pem' } })).toThrow(/needs both a client certificate and its key/);
  });
});

describe('without a server', () => {
  const commands = [
    [], ['server'], ['worker'], ['vm'], ['vm', 'create'], ['vm', 'list'], ['vm', 'inspect'], ['vm', 'pause'], ['vm', 'resume'], ['vm', 'verify'], ['vm', 'destroy'],
    ['migrate'], ['status'], ['list'], ['abort'], ['approve'], ['resolve'], ['bandwidth'],
  ];

  it('--help works for every command', async () => {
    const runs = await inBatches(commands, (c) => ferry(...c, '--help'));
    runs.forEach((run, i) => {
      const name = ['ferry', ...commands[i]].join(' ');
      expect({ name, code: run.code }).toEqual({ name, code: 0 });
      expect(run.stdout).toContain(`Usage: ${name}`);
    });
    expect(runs[0].stdout).toMatch(/Exit codes:[\s\S]*3 +the migration rolled back[\s\S]*4 +refused/);
    expect(runs[8].stdout).toMatch(/--address <host:port>[\s\S]*--tls-server-name/);
  });

  it('refuses bad flags with exit 2 and a one-line reason', async () => {
    const cases: [string[], RegExp][] = [
      [['vm', 'create', 'x', '--host', 'a', '--disk', '12XB', '--memory', '8MiB', '--workload', 'idle'], /--disk.*12XB.*expected a size such as 1GiB/],
      [['vm', 'create', 'x', '--host', 'a', '--disk', '1000', '--memory', '8MiB', '--workload', 'idle'], /not a whole number of 512-byte sectors/],
      [['vm', 'create', 'x', '--host', 'a', '--disk', '1MiB', '--memory', '5000', '--workload', 'idle'], /not a whole number of 4 KiB pages/],
      [['vm', 'create', 'x', '--host', 'a', '--disk', '1MiB', '--memory', '8MiB', '--workload', 'spin'], /--workload.*spin.*Allowed choices are idle/],
      [['vm', 'create', 'x', '--disk', '1MiB', '--memory', '8MiB', '--workload', 'idle'], /required option '--host <host>'/],
      [['migrate', 'x', '--from', 'a', '--to', 'b', '--bandwidth', 'fast'], /expected a rate such as 100MiB\/s/],
      [['migrate', 'x', '--from', 'a', '--to', 'B!'], /invalid host name "B!"/],
      [['migrate', 'x', '--from', 'a', '--to', 'alpha,'], /"alpha," has an empty host name: separate the hosts with single commas/],
      [['migrate', 'x', '--from', 'a', '--to', 'alpha,,beta'], /empty host name/],
      [['migrate', 'x', '--from', 'a', '--to', 'b', '--mode', 'warp'], /Allowed choices are tpm, precopy/],
      [['frobnicate'], /unknown command 'frobnicate'/],
    ];
    const runs = await inBatches(cases, ([args]) => ferry(...args));
    runs.forEach((run, i) => {
      const [args, message] = cases[i];
      expect({ args, code: run.code }).toEqual({ args, code: 2 });
      expect(run.stderr).toMatch(/^ferry: /);
      expect(run.stderr).toMatch(message);
    });
  });

  it.each(['SIGKILL', 'SIGTERM'] as const)('ferry server whose Temporal server gets %s says so and exits 1', async (signal) => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-cli-server-'));
    const run = startFerry(['server', '--db', path.join(dir, 't.db'), '--port', String(await freePort()), '--headless']);
    try {
      const [, pid] = await run.waitFor('stdout', /Temporal dev server \(pid (\d+)\)[\s\S]*Press Ctrl-C/);
      process.kill(Number(pid), signal);
      expect(await run.exited).toBe(1);
      expect(run.stderr()).toMatch(signal === 'SIGKILL' ? /the Temporal dev server \(pid \d+\) was killed by SIGKILL: run `ferry server` again/ : /exited by itself with code 0/);
      expect(run.stdout()).not.toContain('Temporal dev server stopped');
    } finally {
      run.child.kill('SIGKILL');
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  it('says how to fix an unreachable server', async () => {
    const run = await ferry('list', '--address', '127.0.0.1:1');
    expect(run.code).toBe(1);
    expect(run.stderr).toMatch(/^ferry: cannot reach Temporal at 127\.0\.0\.1:1 .*ferry server/);
  });
});

describe('against real agents', () => {
  const [A, B] = uniqueHosts('a', 'b');
  let cluster: LocalCluster;
  let client: FerryClient;
  const vm = testVm('randwrite', { opsPerSecond: 200 });

  beforeAll(async () => {
    ({ cluster, ferry: client } = await startCluster([A, B]));
  });

  afterAll(async () => {
    await cluster?.stop();
  });

  it('creates, lists and inspects a VM', async () => {
    const created = await ferry('vm', 'create', vm.vmId, '--host', A, '--disk', '32MiB', '--memory', '8MiB', '--workload', 'randwrite', '--ops-per-second', '200', '--seed', '3', '--fill', '--json');
    expect(exitOf(created)).toBe(0);
    expect(json(created)).toMatchObject({ vmId: vm.vmId, host: A, state: 'running', diskBytes: 32 * 1024 * 1024, memoryBytes: 8 * 1024 * 1024, workload: 'randwrite', seed: 3 });

    const list = await ferry('vm', 'list', '--host', A);
    expect(list.code).toBe(0);
    expect(list.stdout).toMatch(new RegExp(`^VM +STATE[\\s\\S]*\\n${vm.vmId} +running +running@1`));
    expect(json<{ vmId: string }[]>(await ferry('vm', 'list', '--host', A, '--json')).map((v) => v.vmId)).toContain(vm.vmId);

    const inspect = await ferry('vm', 'inspect', vm.vmId, '--host', A);
    expect(inspect.code).toBe(0);
    expect(inspect.stdout).toContain(`${vm.vmId} on ${A}: running`);

    const again = await ferry('vm', 'create', vm.vmId, '--host', A, '--disk', '32MiB', '--memory', '8MiB', '--workload', 'idle');
    expect(again.code).toBe(4);
    expect(again.stderr).toMatch(new RegExp(`already exists on host ${A}`));
  });

  it('creates a VM at its workload\'s default rate when --ops-per-second is not given', async () => {
    for (const workload of ['idle', 'randwrite'] as const) {
      const id = `${vm.vmId}-rate-${workload}`;
      const created = await ferry('vm', 'create', id, '--host', A, '--disk', '1MiB', '--memory', '1MiB', '--workload', workload, '--json');
      expect(exitOf(created)).toBe(0);
      expect(json(created)).toMatchObject({ vmId: id, workload, opsPerSecond: DEFAULT_OPS_PER_SECOND[workload] });
      expect(exitOf(await ferry('vm', 'destroy', id, '--host', A))).toBe(0);
    }
    expect(DEFAULT_OPS_PER_SECOND.idle).toBeGreaterThan(0);
    const help = await ferry('vm', 'create', '--help');
    expect(help.stdout.replace(/\s+/g, ' ')).toContain(`default by workload: idle ${DEFAULT_OPS_PER_SECOND.idle}, memhog 0,`);
  });

  it('migrates with --wait --json, then status and list show it', async () => {
    const run = await ferry('migrate', vm.vmId, '--from', A, '--to', B, '--bandwidth', '100MiB/s', '--wait', '--json');
    expect(exitOf(run)).toBe(0);
    const report = json<MigrationReport>(run);
    expect(report).toMatchObject({ vmId: vm.vmId, outcome: 'completed', sourceHost: A, destinationHost: B });
    expect(run.stderr).not.toContain('%'); // no progress bar with --json

    const status = await ferry('status', vm.vmId, '--json');
    expect(status.code).toBe(0);
    expect(json(status)).toMatchObject({ vmId: vm.vmId, status: 'COMPLETED', report: { outcome: 'completed', destinationHost: B }, error: null });
    expect((await ferry('status', vm.vmId)).stdout).toContain(`${vm.vmId}: completed`);

    // Visibility is eventually consistent.
    let listed: { vmId: string; status: string; destinationHost: string; phase: string }[] = [];
    for (let i = 0; i < 20 && listed[0]?.phase !== 'completed'; i++) {
      if (i) await new Promise((r) => setTimeout(r, 500));
      listed = json(await ferry('list', '--vm', vm.vmId, '--json'));
    }
    expect(listed[0]).toMatchObject({ vmId: vm.vmId, status: 'COMPLETED', phase: 'completed', sourceHost: A, destinationHost: B });
    expect((await ferry('list', '--vm', vm.vmId)).stdout).toMatch(new RegExp(`\\n${vm.vmId} +completed +completed +${A} +${B} `));
  });

  it('migrates back with a progress bar and the report, finding the source itself', async () => {
    const run = await ferry('migrate', vm.vmId, '--to', A, '--wait');
    expect(exitOf(run)).toBe(0);
    expect(run.stderr).toContain(`migrating ${vm.vmId}: ${B} → ${A}`);
    expect(run.stderr).toMatch(/\| \d+% \| disk 32\.0 MiB \(sent/);
    expect(run.stdout).toMatch(new RegExp(`^${vm.vmId}: completed\\n  ${B} → ${A}  mode tpm`));
    expect((await client.hostCommand(A, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');
  });

  it('refuses the same source and destination (exit 4, naming the fix)', async () => {
    const run = await ferry('migrate', vm.vmId, '--from', A, '--to', A);
    expect(run.code).toBe(4);
    expect(run.stderr).toMatch(new RegExp(`^ferry: the source host ${A} is also a destination: a VM cannot migrate to the host it runs on; name another destination`));
  });

  it('refuses a host without an agent (exit 4, HostUnavailable)', async () => {
    const run = await ferry('migrate', vm.vmId, '--from', A, '--to', 'nowhere', '--json');
    expect(run.code).toBe(4);
    expect(run.stderr).toMatch(/^ferry: no agent is polling task queue host-nowhere: start `ferry worker --host nowhere`/);
    expect(json(run)).toMatchObject({ error: { name: 'HostUnavailable', type: 'HostUnavailable', refused: true } });
  });

  it('refuses an unknown VM and an unknown migration (exit 4)', async () => {
    const unknown = `no-such-vm-${process.pid}`;
    const run = await ferry('migrate', unknown, '--from', A, '--to', B);
    expect(run.code).toBe(4);
    expect(run.stderr).toMatch(new RegExp(`VM ${unknown} does not exist on host ${A}`));
    const status = await ferry('status', `never-migrated-${process.pid}`);
    expect(status.code).toBe(4);
    expect(status.stderr).toMatch(/no migration of VM never-migrated-\d+ found/);
  });

  it('status answers within a bounded wait when the agent holding the workflow is stopped, naming its host', async () => {
    const other = testVm('idle', { diskBytes: 1024 * 1024, memoryBytes: 1024 * 1024, opsPerSecond: 10 });
    await client.hostCommand(A, 'vmCreate', other);
    const handle = await client.migrate({ vmId: other.vmId, sourceHost: A, destinationHosts: [B], cutover: 'manual' });
    await waitForProgress(handle, 'awaiting-cutover', (p) => p.phase === 'awaiting-cutover');
    // Both agents run a workflow worker: stopped, neither can answer the progress query.
    const pids = [A, B].map((h) => cluster.agents.get(h)!.process.pid!);
    for (const pid of pids) process.kill(pid, 'SIGSTOP');
    let status: Run;
    try {
      status = await ferry('status', other.vmId, '--json');
    } finally {
      for (const pid of pids) process.kill(pid, 'SIGCONT');
    }
    expect(exitOf(status)).toBe(0);
    const state = json<{ status: string; phase: string; progress: unknown; progressUnavailable: string }>(status);
    expect(state).toMatchObject({ status: 'RUNNING', phase: 'awaiting-cutover', progress: null });
    expect(state.progressUnavailable).toMatch(new RegExp(`^host (${A}|${B}) does not answer: it holds the migration's workflow and did not answer within 5 s \\(is \`ferry worker --host (${A}|${B})\` running, and not stopped\\?\\)`));
    await handle.abort('test done');
    expect((await handle.result()).outcome).toBe('rolled-back');
    await client.hostCommand(A, 'vmDestroy', { vmId: other.vmId });
  });

  it('switches over a --cutover manual migration once approved', async () => {
    expect(exitOf(await ferry('migrate', vm.vmId, '--from', A, '--to', B, '--cutover', 'manual'))).toBe(0);
    let phase = '';
    for (let i = 0; i < 60 && !['awaiting-cutover', 'completed', 'rolled-back', 'failed'].includes(phase); i++) {
      if (i) await new Promise((r) => setTimeout(r, 500));
      phase = json<{ progress: { phase: string } | null }>(await ferry('status', vm.vmId, '--json')).progress?.phase ?? '';
    }
    expect(phase).toBe('awaiting-cutover');
    const running = json<{ vmId: string; status: string }[]>(await ferry('list', '--running', '--vm', vm.vmId, '--json'));
    expect(running).toContainEqual(expect.objectContaining({ vmId: vm.vmId, status: 'RUNNING' }));

    expect(exitOf(await ferry('approve', vm.vmId))).toBe(0);
    const follow = await ferry('status', vm.vmId, '--follow');
    expect(exitOf(follow)).toBe(0);
    expect(follow.stdout).toMatch(new RegExp(`^${vm.vmId}: completed\n  ${A} → ${B}`));
  });

  it('aborts a --cutover manual migration: it ends rolled back and the VM runs on the source', async () => {
    const started = await ferry('migrate', vm.vmId, '--from', B, '--to', A, '--cutover', 'manual');
    expect(exitOf(started)).toBe(0);
    expect(started.stdout).toContain(`ferry approve ${vm.vmId}`);

    const second = await ferry('migrate', vm.vmId, '--from', B, '--to', A);
    expect(second.code).toBe(4);
    expect(second.stderr).toMatch(/is already migrating/);

    expect((await ferry('bandwidth', vm.vmId, '1Gbit/s')).code).toBe(0);
    const abort = await ferry('abort', vm.vmId, '--reason', 'cli test', '--json');
    expect(abort.code).toBe(0);
    expect(json(abort)).toMatchObject({ vmId: vm.vmId, accepted: true });

    const follow = await ferry('status', vm.vmId, '--follow', '--json');
    expect(json(follow)).toMatchObject({ status: 'COMPLETED', report: { outcome: 'rolled-back', reason: expect.stringContaining('cli test') } });
    expect(follow.code).toBe(3);
    expect((await client.hostCommand(B, 'vmInspect', { vmId: vm.vmId })).state).toBe('running');

    const late = await ferry('abort', vm.vmId);
    expect(late.code).toBe(4);
    expect(late.stderr).toMatch(/no running migration of VM/);
  });

  it('destroys the VM, and nothing of it stays on the host', async () => {
    const named = async (dir: string): Promise<string[]> =>
      (await fs.readdir(dir, { recursive: true })).filter((f) => f.includes(vm.vmId)).sort();
    // It has run on B since a migration: B tracks its writes for the next incremental one.
    expect(await named(cluster.home(B))).toContain(path.join('im', `${vm.vmId}.json`));
    const run = await ferry('vm', 'destroy', vm.vmId, '--host', B);
    expect(exitOf(run)).toBe(0);
    expect(await named(cluster.home(B))).toEqual([]);
    const gone = await ferry('vm', 'inspect', vm.vmId, '--host', B);
    expect(gone.code).toBe(4);
    expect(gone.stderr).toMatch(new RegExp(`does not exist on host ${B}`));
  });
});
