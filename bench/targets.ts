// The benchmark's targets (issues #6 and #12), each with the value measured in the run and whether it
// was met. `met` is null when the run did not measure it (a scenario left out, a failed run, no QEMU).
import type { Measured } from './report';
import type { QemuRow } from './qemu';

export interface Target {
  /** What is measured and against what. */
  what: string;
  value: number | null;
  /** value ≤ bound is met. */
  bound: number;
  unit: string;
  met: boolean | null;
}

export type Targets = Record<string, Target>;

function target(what: string, value: number | null | undefined, bound: number, unit = ''): Target {
  const v = value === null || value === undefined || !Number.isFinite(value) ? null : value;
  return { what, value: v, bound, unit, met: v === null ? null : v <= bound };
}

/** The simulator's targets, from `npm run bench`'s summary. */
export function simTargets(s: Measured): Targets {
  const heavyDone = s.heavy_writer.completed === true;
  return {
    downtime_p50_ms: target('downtime p50, randwrite, tpm', s.downtime_ms.n ? s.downtime_ms.p50 : null, 20, 'ms'),
    downtime_max_ms: target('downtime max, randwrite, tpm', s.downtime_ms.n ? s.downtime_ms.max : null, 50, 'ms'),
    total_over_limit: target('idle total / physical limit (cp of disk + memory)', s.total_over_limit, 1.3, '×'),
    tracking_overhead: target('write-tracking cost, randwrite', s.tracking_overhead, 0.01),
    im_bytes_over_expected: target('incremental bytes / (blocks written + memory)', s.im.bytes_over_expected, 1.1, '×'),
    orchestration_overhead_ms: target('orchestration overhead per migration, median', s.orchestration_overhead_ms, 250, 'ms'),
    concurrent_failures: target('concurrent migrations that failed', s.concurrent.failures, 0),
    heavy_writer_total_over_idle: target('heavy writer total / idle total, tpm', heavyDone ? s.heavy_writer.total_over_idle : null, 2, '×'),
    heavy_writer_downtime_ms: target('heavy writer downtime, tpm', heavyDone ? s.heavy_writer.downtime_ms : null, 50, 'ms'),
  };
}

/** Ferry against QEMU's own mirror + migrate, per workload (medians of the side-by-side run). */
export function qemuTargets(rows: QemuRow[]): Targets {
  const out: Targets = {};
  const median = (system: string, workload: string, direction: string, pick: (r: QemuRow) => { n: number; median: number }) => {
    const row = rows.find((r) => r.system === system && r.workload === workload && r.direction === direction);
    const s = row ? pick(row) : null;
    return s && s.n > 0 ? s.median : null;
  };
  const ratio = (a: number | null, b: number | null) => (a === null || b === null || b === 0 ? null : a / b);
  const workloads = [...new Set(rows.filter((r) => r.system === 'ferry' && r.workload).map((r) => r.workload!))];
  for (const w of workloads) {
    const native = (pick: (r: QemuRow) => { n: number; median: number }) => median('qemu', w, 'a→b', pick);
    const ferry = (dir: string, pick: (r: QemuRow) => { n: number; median: number }) => median('ferry', w, dir, pick);
    out[`qemu_${w}_downtime`] = target(`${w}: Ferry downtime / QEMU native's`, ratio(ferry('a→b', (r) => r.downtime_ms), native((r) => r.downtime_ms)), 1, '×');
    out[`qemu_${w}_total`] = target(`${w}: Ferry total / QEMU native's`, ratio(ferry('a→b', (r) => r.total_ms), native((r) => r.total_ms)), 1.1, '×');
    // QEMU native has no way back but another full migration.
    out[`qemu_${w}_way_back`] = target(`${w}: Ferry's incremental way back / QEMU native's`, ratio(ferry('b→a', (r) => r.total_ms), native((r) => r.total_ms)), 0.25, '×');
  }
  return out;
}

export function formatTargets(targets: Targets): string {
  const rows = Object.values(targets).map((t) => [
    t.what,
    t.value === null ? '-' : `${Number(t.value.toPrecision(3))}${t.unit === '×' ? '×' : t.unit ? ` ${t.unit}` : ''}`,
    `≤ ${t.bound}${t.unit === '×' ? '×' : t.unit ? ` ${t.unit}` : ''}`,
    t.met === null ? 'not measured' : t.met ? 'met' : 'MISSED',
  ]);
  const header = ['target', 'measured', 'bound', ''];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cols: string[]) => cols.map((c, i) => (i === 1 || i === 2 ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ').trimEnd();
  return ['Targets', line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}
