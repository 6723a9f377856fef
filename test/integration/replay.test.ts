// Upgrades while migrations run: every recorded history of a real migration (completed, rolled back,
// failed over, with faults) and of the admission and host-command workflows replays through today's
// workflow code with Temporal's replayer. A change that would break a migration in flight (a command
// added, removed or reordered without patched()) fails here. Re-record with `npm run record-histories`
// only for a change that is meant to be incompatible, and say so in its commit.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Worker } from '@temporalio/worker';
import { DeterminismViolationError } from '@temporalio/workflow';
import { historyFromText } from '../../scripts/record-histories';

const DIR = path.resolve(__dirname, '..', 'fixtures', 'histories');
const WORKFLOWS = path.resolve(__dirname, '..', '..', 'workflows');
jest.setTimeout(180_000);

interface Index {
  histories: { file: string; workflowId: string; workflowType: string; events: number }[];
}

async function load(file: string) {
  return historyFromText(await fs.readFile(path.join(DIR, file), 'utf8'));
}


describe('recorded histories', () => {
  let index: Index;

  beforeAll(async () => {
    const text = await fs.readFile(path.join(DIR, 'index.json'), 'utf8').catch(() => {
      throw new Error(`no recorded histories in ${DIR}: run npm run record-histories`);
    });
    index = JSON.parse(text) as Index;
  });

  it('cover every kind of migration end and the other workflows', () => {
    const names = index.histories.map((h) => h.file);
    for (const kind of ['completed-full', 'completed-incremental', 'rolled-back-abort', 'failed-over', 'fault-', 'admission-', 'host-command']) {
      expect(names.some((n) => n.startsWith(kind))).toBe(true);
    }
  });

  it('replay through the current workflow code without a determinism error', async () => {
    const histories = await Promise.all(index.histories.map(async (h) => ({ workflowId: h.workflowId, history: await load(h.file) })));
    const failures: string[] = [];
    let replayed = 0;
    for await (const result of Worker.runReplayHistories({ workflowsPath: require.resolve(WORKFLOWS) }, histories)) {
      replayed++;
      if (result.error) failures.push(`${result.workflowId}: ${result.error.message}`);
    }
    expect(replayed).toBe(index.histories.length);
    expect(failures).toEqual([]);
  });

  it('catch a changed workflow (negative control)', async () => {
    const entry = index.histories.find((h) => h.file === 'completed-full.json')!;
    await expect(
      Worker.runReplayHistory({ workflowsPath: path.resolve(__dirname, '..', 'fixtures', 'workflows', 'changed-migrate-vm.ts') }, await load(entry.file), entry.workflowId),
    ).rejects.toBeInstanceOf(DeterminismViolationError);
  });
});
