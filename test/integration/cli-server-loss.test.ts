// `ferry status --follow` while the Temporal server goes away (SIGKILL) and comes back on the same
// SQLite file: it says it lost the server, keeps trying, and follows the migration to its end; a
// second one stopped with Ctrl-C while the server is away says so and exits 130.
import { OwnServer } from '../support/own-server';
import { testVm } from '../support/cluster';
import { startFerry, type LiveRun } from '../support/cli';
import { setTimeout as sleep } from 'node:timers/promises';

jest.setTimeout(600_000);

let own: OwnServer | null = null;
const runs: LiveRun[] = [];

afterAll(async () => {
  for (const r of runs) r.child.kill('SIGKILL');
  await own?.stop();
});

it('status --follow says the server is gone, keeps trying, and follows to the end once it is back (Ctrl-C stops it)', async () => {
  own = await OwnServer.start(['a', 'b']);
  const { ferry } = own;
  const vm = testVm('randwrite', { opsPerSecond: 20, diskBytes: 48 * 1024 * 1024 });
  await ferry.hostCommand('a', 'vmCreate', vm);
  const handle = await ferry.migrate({ vmId: vm.vmId, sourceHost: 'a', destinationHosts: ['b'], bandwidthBytesPerSecond: 2 * 1024 * 1024 });

  const env = { TEMPORAL_ADDRESS: own.server.address };
  const follow = startFerry(['status', vm.vmId, '--follow'], env);
  const interrupted = startFerry(['status', vm.vmId, '--follow', '--json'], env);
  runs.push(follow, interrupted);
  await follow.waitFor('stderr', /disk-precopy/);

  await own.kill();
  const lost = /ferry: lost the Temporal server at 127\.0\.0\.1:\d+ .*trying again every 2 s until it answers \(Ctrl-C stops watching; the migration goes on\)/;
  await follow.waitFor('stderr', lost);
  await interrupted.waitFor('stderr', lost);
  await sleep(5000); // and they go on trying
  expect(follow.child.exitCode).toBeNull();
  interrupted.child.kill('SIGINT');
  // (the output is in the failure message when the exit code is not 130)
  expect({ code: await interrupted.exited, stderr: interrupted.stderr() }).toMatchObject({ code: 130, stderr: expect.stringContaining(`stopped watching; the migration of ${vm.vmId} goes on`) });

  await own.restart();
  await follow.waitFor('stderr', /ferry: the Temporal server at .* answers again/);
  expect(await follow.exited).toBe(0);
  expect(follow.stdout()).toMatch(new RegExp(`^${vm.vmId}: completed\\n`));
  expect((await handle.result()).outcome).toBe('completed');
});
