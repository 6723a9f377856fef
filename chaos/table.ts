// The matrix as a terminal table: one row per fault × point, the seeds of the cell summarised.
import type { CellResult } from './cell';

const HEAD = ['fault', 'point', 'outcome', 'violations', 'hashes equal', 'running copies', 'duration s', 'ok'];

export function formatTable(cells: CellResult[]): string {
  const groups = new Map<string, CellResult[]>();
  for (const c of cells) {
    const key = `${c.fault}\0${c.point}`;
    groups.set(key, [...(groups.get(key) ?? []), c]);
  }
  const rows = [...groups.values()].map((g) => [
    g[0].fault,
    g[0].point,
    tally(g.map((c) => c.outcome)),
    tally(g.map((c) => (c.violations === null ? '-' : String(c.violations)))),
    tally(g.map((c) => (c.hashesEqual === null ? '-' : c.hashesEqual ? 'yes' : 'NO'))),
    tally(g.map((c) => String(c.runningCopies))),
    g.every((c) => c.outcome === 'n/a') ? '-' : g.map((c) => (c.durationMs / 1000).toFixed(1)).join(' '),
    `${g.filter((c) => c.ok).length}/${g.length}`,
  ]);
  const widths = HEAD.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((v, i) => v.padEnd(widths[i])).join(' | ').trimEnd();
  return [line(HEAD), widths.map((w) => '-'.repeat(w)).join('-|-'), ...rows.map(line)].join('\n');
}

/** "completed ×2, rolled-back" style summary of the seeds of one cell. */
function tally(values: string[]): string {
  const counts = new Map<string, number>();
  for (const v of values) counts.set(v, (counts.get(v) ?? 0) + 1);
  return [...counts].map(([v, n]) => (n > 1 ? `${v} ×${n}` : v)).join(', ');
}

/** The problems of failed cells and the notes of the others, one line each. */
export function formatDetails(cells: CellResult[]): string {
  return cells
    .filter((c) => !c.ok || c.outcome === 'waiting' || c.outcome === 'rolled-back' || c.outcome === 'n/a')
    .map((c) => `${c.ok ? 'note' : 'FAIL'} ${c.fault} @ ${c.point} seed ${c.seed}: ${[c.outcome, c.detail, ...c.problems].filter(Boolean).join('; ')}`)
    .join('\n');
}
