// The matrix: every fault × every point × seeds, one cell after another on one environment.
import type { ChaosEnv } from './env';
import { FAULTS, type FaultName } from './faults';
import { POINTS, type PointName } from './points';
import { runCell, type CellOptions, type CellResult } from './cell';

export interface MatrixOptions extends CellOptions {
  faults?: readonly FaultName[];
  points?: readonly PointName[];
  seeds?: number;
  /** Explicit cells instead of faults × points (the CI subset). */
  cells?: readonly [FaultName, PointName][];
  onCell?: (cell: CellResult) => void | Promise<void>;
}

export async function runMatrix(env: ChaosEnv, opts: MatrixOptions = {}): Promise<CellResult[]> {
  const pairs = opts.cells ?? (opts.faults ?? FAULTS).flatMap((f) => (opts.points ?? POINTS).map((p) => [f, p] as [FaultName, PointName]));
  const out: CellResult[] = [];
  for (const [f, p] of pairs) {
    for (let seed = 1; seed <= (opts.seeds ?? 3); seed++) {
      const cell = await runCell(env, f, p, seed, opts);
      out.push(cell);
      await opts.onCell?.(cell);
    }
  }
  return out;
}
