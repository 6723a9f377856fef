// The CI subset of the chaos matrix (npm run chaos runs all of it): every fault kind and every
// injection point at least once, through the same runner, on a Temporal server of its own (one cell
// kills and restarts it).
import { startChaosEnv, stopChaosEnv, type ChaosEnv } from '../../chaos/env';
import { runMatrix } from '../../chaos/matrix';
import { formatDetails, formatTable } from '../../chaos/table';
import type { FaultName } from '../../chaos/faults';
import type { PointName } from '../../chaos/points';

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

let env: ChaosEnv | null = null;

afterAll(async () => {
  if (env) await stopChaosEnv(env);
});

it('every fault kind at every point: one running copy, no stale read, reference hashes, a clear end, nothing left over', async () => {
  env = await startChaosEnv();
  const cells = await runMatrix(env, { cells: CELLS, seeds: 1, destinationDeadlineSeconds: 5, tag: 'ci' });
  const failed = cells.filter((c) => !c.ok);
  if (failed.length > 0) throw new Error(`${failed.length} cell(s) failed:\n${formatTable(cells)}\n${formatDetails(cells)}`);
  expect(cells.map((c) => c.outcome)).toEqual(['completed', 'rolled-back', 'completed', 'completed', 'completed', 'completed', 'completed', 'completed']);
  expect(cells.every((c) => c.violations === 0 && c.hashesEqual === true && c.runningCopies === 1)).toBe(true);
});
