// SVG charts of a run, drawn by vega-lite (compiled to vega, rendered headless). Both packages are
// devDependencies; without them (a production install) the benchmark prints a note and writes no
// chart. They are looked up in this repository's node_modules, or under FERRY_BENCH_NODE_MODULES (a
// directory holding a node_modules with vega and vega-lite).
import { promises as fs } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import type { Results, Summary } from './report';

interface VegaLite {
  compile(spec: object): { spec: object };
}
interface Vega {
  parse(spec: object): unknown;
  View: new (runtime: unknown, opts: { renderer: 'none' }) => { toSVG(): Promise<string>; finalize(): void };
}

async function load<T>(name: string): Promise<T | null> {
  const bases = [process.env.FERRY_BENCH_NODE_MODULES, path.resolve(__dirname, '..')].filter((b): b is string => !!b);
  for (const base of bases) {
    try {
      const file = createRequire(path.join(base, 'noop.js')).resolve(name);
      return (await import(file)) as T;
    } catch {
      // not installed there
    }
  }
  return null;
}

type Row = Record<string, string | number | null>;

function specs(res: Results, summary: Summary): Record<string, object> {
  const ok = res.runs.filter((r) => r.outcome === 'completed' && r.scenario === 'matrix');
  const rows: Row[] = ok.map((r) => ({
    workload: r.workload,
    mode: r.mode,
    kind: r.kind,
    downtime_ms: r.downtime_ms,
    total_s: r.total_ms / 1000,
    sent_mb: (r.disk_bytes + r.memory_bytes) / 1e6,
  }));
  const base = { $schema: 'https://vega.github.io/schema/vega-lite/v6.json', width: 360, height: 220 };
  const rounds: Row[] = [];
  for (const r of [...ok.filter((x) => x.kind === 'full' && x.rep === 1), ...res.heavy]) {
    const series = r.scenario === 'heavy-writer' ? `heavy writer (${r.mode})` : `${r.workload} (${r.mode})`;
    r.dirty_blocks_per_round.forEach((blocks, i) => rounds.push({ series, round: i + 1, blocks }));
  }
  // Ferry beside QEMU native on the real guest: each run, the way there (a→b) and Ferry's incremental way back.
  const side: Row[] = (res.qemu?.runs ?? [])
    .filter((r) => r.ok && r.system !== 'tcp')
    .map((r) => ({
      workload: r.workload,
      system: r.system === 'qemu' ? 'QEMU mirror + migrate' : r.direction === 'b→a' ? 'Ferry, incremental back' : 'Ferry tpm',
      downtime_ms: r.downtime_ms,
      total_s: r.total_ms / 1000,
    }));
  const sideBySide = (field: 'downtime_ms' | 'total_s', title: string) => ({
    ...base,
    title,
    data: { values: side.filter((r) => r[field] != null) },
    mark: 'bar',
    encoding: {
      x: { field: 'workload', type: 'nominal' },
      xOffset: { field: 'system' },
      color: { field: 'system' },
      y: { aggregate: 'median', field, title: field === 'total_s' ? 'total (s)' : 'downtime (ms)' },
    },
  });
  const qemuCharts: Record<string, object> = side.length
    ? {
        'qemu-downtime.svg': sideBySide('downtime_ms', 'QEMU guest: downtime seen from outside (median)'),
        'qemu-total.svg': sideBySide('total_s', 'QEMU guest: total migration time (median)'),
      }
    : {};
  return {
    ...qemuCharts,
    'downtime.svg': {
      ...base,
      title: 'Guest-observed downtime (median)',
      data: { values: rows.filter((r) => r.downtime_ms != null) },
      mark: 'bar',
      encoding: {
        x: { field: 'workload', type: 'nominal' },
        xOffset: { field: 'mode' },
        color: { field: 'mode' },
        y: { aggregate: 'median', field: 'downtime_ms', title: 'downtime (ms)' },
      },
    },
    'total-vs-limit.svg': {
      ...base,
      title: `Total time of full migrations; rule: physical limit (cp + fsync) ${summary.physical_limit_s ?? '?'} s`,
      layer: [
        {
          data: { values: rows.filter((r) => r.kind === 'full') },
          mark: 'bar',
          encoding: {
            x: { field: 'workload', type: 'nominal' },
            xOffset: { field: 'mode' },
            color: { field: 'mode' },
            y: { aggregate: 'median', field: 'total_s', title: 'total (s)' },
          },
        },
        { data: { values: [{ limit: summary.physical_limit_s }] }, mark: { type: 'rule', color: 'red' }, encoding: { y: { field: 'limit', type: 'quantitative' } } },
      ],
    },
    'incremental-vs-full.svg': {
      ...base,
      title: 'Incremental (back) against full: data sent',
      data: { values: rows },
      mark: 'bar',
      encoding: {
        x: { field: 'workload', type: 'nominal' },
        xOffset: { field: 'kind' },
        color: { field: 'kind' },
        y: { aggregate: 'median', field: 'sent_mb', title: 'sent (MB)' },
        column: { field: 'mode' },
      },
    },
    'dirty-rounds.svg': {
      ...base,
      title: 'Dirty blocks per disk round',
      data: { values: rounds },
      mark: { type: 'line', point: true },
      encoding: {
        x: { field: 'round', type: 'ordinal' },
        y: { field: 'blocks', type: 'quantitative', scale: { type: 'symlog' } },
        color: { field: 'series' },
      },
    },
  };
}

/** Writes the charts into `dir`; returns the files written (none without vega / vega-lite). */
export async function writeCharts(dir: string, res: Results, summary: Summary, say: (line: string) => void): Promise<string[]> {
  const [vega, vl] = await Promise.all([load<Vega>('vega'), load<VegaLite>('vega-lite')]);
  if (!vega || !vl) {
    say('charts: vega and vega-lite are not installed (npm install --save-dev vega vega-lite); no chart written');
    return [];
  }
  await fs.mkdir(dir, { recursive: true });
  const written: string[] = [];
  for (const [name, spec] of Object.entries(specs(res, summary))) {
    const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
    try {
      const file = path.join(dir, name);
      await fs.writeFile(file, await view.toSVG());
      written.push(file);
    } finally {
      view.finalize();
    }
  }
  return written;
}
