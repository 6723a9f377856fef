// The CI subset of the chaos matrix (npm run chaos runs all of it): every fault kind and every
// injection point at least once, through the same runner, on a Temporal server of its own (one cell
// kills and restarts it).
import { startChaosEnv, stopChaosEnv, type ChaosEnv } from '../../chaos/env';
import { runMatrix } from '../../chaos/matrix';
import { formatDetails, formatTable } from '../../chaos/table';
import type { FaultName } from '../../chaos/faults';
import type { PointName } from '../../chaos/points';
import type { CellResult } from '../../chaos/cell';
import { describeQemu } from '../support/qemu';

jest.setTimeout(600_000);

const CELLS: [FaultName, PointName][] = [
  ['kill-source', 'disk-precopy'],
  ['lose-dest', 'dirty-rounds'],
  ['corrupt-frame', 'memory-precopy'],
  ['restart-temporal', 'before-pause'],
  ['cut-link', 'after-pause'],
  ['kill-source', 'after-prepared'],
  ['kill-dest', 'after-commit'],
  ['cut-link', 'postcopy'],
];

/**
 * On QEMU: the machine stream cut while it flows; the postcopy disk server's agent restarted under a
 * running guest; a source agent killed with QEMU held at pre-switchover (its orphan stream must be
 * cancelled, and the guest still migrate running); a destination lost before the freeze (a rollback,
 * not a wait).
 */
const QEMU_CELLS: [FaultName, PointName][] = [
  ['cut-link', 'memory-precopy'],
  ['kill-dest', 'postcopy'],
  ['kill-source', 'after-pause'],
  ['lose-dest', 'before-pause'],
];

let env: ChaosEnv | null = null;

afterEach(async () => {
  if (env) await stopChaosEnv(env);
  env = null;
});

function expectAllPassed(cells: CellResult[], outcomes: string[]): void {
  const failed = cells.filter((c) => !c.ok);
  if (failed.length > 0) throw new Error(`${failed.length} cell(s) failed:\n${formatTable(cells)}\n${formatDetails(cells)}`);
  expect(cells.map((c) => c.outcome)).toEqual(outcomes);
  expect(cells.every((c) => c.violations === 0 && c.hashesEqual === true && c.runningCopies === 1)).toBe(true);
}

it('every fault kind at every point: one running copy, no stale read, reference hashes, a clear end, nothing left over', async () => {
  env = await startChaosEnv();
  const cells = await runMatrix(env, { cells: CELLS, seeds: 1, destinationDeadlineSeconds: 5, tag: 'ci' });
  expectAllPassed(cells, ['completed', 'rolled-back', 'completed', 'completed', 'completed', 'completed', 'completed', 'completed']);
});

describeQemu('the chaos matrix on QEMU guests', () => {
  it('QEMU cells: one running QEMU, the guest verifies clean, a clear end, nothing left over', async () => {
    env = await startChaosEnv({ hypervisor: 'qemu' });
    const cells = await runMatrix(env, { cells: QEMU_CELLS, seeds: 1, destinationDeadlineSeconds: 5, tag: 'ciq' });
    expectAllPassed(cells, ['completed', 'completed', 'completed', 'rolled-back']);
  });
});
