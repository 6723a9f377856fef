// A rolling upgrade in the middle of a migration: each agent in turn is stopped and started again from
// a changed build of Ferry (a copy of this checkout whose migrateVm has a new step behind patched()),
// host by host, while a migration between them runs. The migration completes with correct data, the
// changed code ran its end (the new step's memo is there), and its history replays through the
// changed build.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { Worker } from '@temporalio/worker';
import { useCluster, testVm, uniqueHosts, expectGuestCorrect, waitForProgress } from '../support/cluster';

jest.setTimeout(300_000);

const REPO = path.resolve(__dirname, '..', '..');
const SOURCES = ['activities', 'client', 'common', 'dataplane', 'hypervisor', 'migration', 'scripts', 'worker', 'workflows', 'package.json', 'tsconfig.json'];
const [a, b] = uniqueHosts('up-a', 'up-b');
const t = useCluster([a, b]);
let copy: string | null = null;

afterAll(async () => {
  if (copy) await fs.rm(copy, { recursive: true, force: true });
});

/** The anchors the change is made at: if migrate-vm.ts moves them, update these two. */
const IMPORT_ANCHOR = "  type ActivityOptions,\n} from '@temporalio/workflow';";
const FINISH_ANCHOR = "  async function finish(outcome: 'completed' | 'rolled-back', reason?: string): Promise<MigrationReport> {\n";

/** A copy of the sources whose migrateVm, once past this point, records a memo behind patched(). */
async function changedBuild(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-upgraded-'));
  for (const entry of SOURCES) await fs.cp(path.join(REPO, entry), path.join(dir, entry), { recursive: true });
  await fs.symlink(path.join(REPO, 'node_modules'), path.join(dir, 'node_modules'));
  const file = path.join(dir, 'workflows', 'migrate-vm.ts');
  const source = await fs.readFile(file, 'utf8');
  if (!source.includes(IMPORT_ANCHOR) || !source.includes(FINISH_ANCHOR)) {
    throw new Error('upgrade test: workflows/migrate-vm.ts no longer has the anchors the changed build is made at; update IMPORT_ANCHOR and FINISH_ANCHOR');
  }
  const changed = source
    .replace(IMPORT_ANCHOR, `  patched,\n${IMPORT_ANCHOR}`)
    .replace(FINISH_ANCHOR, `${FINISH_ANCHOR}    if (patched('upgrade-test-probe')) upsertMemo({ upgradeProbe: 'changed build' });\n`);
  await fs.writeFile(file, changed);
  return dir;
}

it('upgrades the agents host by host while a migration between them runs', async () => {
  copy = await changedBuild();
  const { cluster, ferry } = t;
  const vm = testVm('randwrite', { opsPerSecond: 200, diskBytes: 24 * 1024 * 1024 });
  await ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 2 * 1024 * 1024 });
  await waitForProgress(handle, 'the disk precopy', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 0);

  for (const host of [a, b]) {
    await cluster.killAgent(host, 'SIGTERM'); // as systemctl stop: a graceful stop, then the new build
    await cluster.startAgent(host, {}, { repo: copy });
    if (host === a) await handle.setBandwidth(null);
  }

  const report = await handle.result();
  expect(report.outcome).toBe('completed');
  expect(report.diskPrecopyResumedFromBlock).toBeGreaterThanOrEqual(0);
  const description = await handle.workflow.describe();
  expect(description.memo?.upgradeProbe).toBe('changed build');
  await expectGuestCorrect(ferry, b, vm);

  // The history (old code's commands, then the changed code's marker) replays through the changed build.
  const history = await handle.workflow.fetchHistory();
  await Worker.runReplayHistory({ workflowsPath: require.resolve(path.join(copy, 'workflows')) }, history, handle.workflowId);
});
