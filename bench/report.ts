// The terminal table and the JSON summary.
import type { Baselines } from './baselines';
import type { BandwidthResult, ConcurrentResult, ImResult, RunRecord } from './scenarios';
import { median, percentile, spread } from './stats';
import type { TrackingResult } from './tracking';
import { formatGuestRounds } from './guest-rate';
import { formatQemuTable, type QemuBenchResult } from './qemu';
import { formatTargets, qemuTargets, simTargets } from './targets';

export interface Results {
  runs: RunRecord[];
  baselines: Baselines | null;
  tracking: TrackingResult[];
  im: ImResult | null;
  heavy: RunRecord[];
  bandwidth: BandwidthResult | null;
  concurrent: ConcurrentResult | null;
  /** Guest read-check violations per VM, read before each VM was destroyed (all must be 0). */
  violations: Record<string, number>;
  /** The side-by-side run on QEMU (Ferry, QEMU's own mirror + migrate, a TCP copy), when QEMU is provisioned. */
  qemu: QemuBenchResult | null;
}

/** A finite number rounded to `digits`, or null (JSON has no NaN). */
const num = (x: number | null | undefined, digits = 3): number | null => (x != null && Number.isFinite(x) ? Number(x.toFixed(digits)) : null);

const completed = (runs: RunRecord[]) => runs.filter((r) => r.outcome === 'completed');

/**
 * The summary compared over time. Definitions:
 *   downtime_ms             guest-observed, over the tpm randwrite runs of the matrix (full and incremental)
 *   total_s                 median total time of the full tpm migrations of the idle VM
 *   physical_limit_s        cp of the disk image + fsync of the copy, + cp of a memory-sized file
 *   im.*                    the controlled incremental scenario (known write set, halted guest)
 *   tracking_overhead       1 - (guest randwrite ops/s with tracking) / (without), median of alternating pairs
 *   orchestration_overhead_ms  median over the matrix runs of total time minus the time the agents spent
 *                           moving bytes (durations in the transfer activities' results)
 *   heavy_writer.total_over_idle  heavy writer's tpm total / total_s
 *   targets.*               each target with its measured value, bound and met (true, false, or null
 *                           when the run did not measure it): targets.ts
 */
export function summarize(res: Results) {
  const base = measured(res);
  return { ...base, targets: { ...simTargets(base), ...(res.qemu ? qemuTargets(res.qemu.rows) : {}) } };
}

function measured(res: Results) {
  const ok = completed(res.runs.filter((r) => r.scenario === 'matrix'));
  const downtimes = ok.filter((r) => r.mode === 'tpm' && r.workload === 'randwrite' && r.downtime_ms != null).map((r) => r.downtime_ms!);
  const idleTotals = ok.filter((r) => r.mode === 'tpm' && r.workload === 'idle' && r.kind === 'full').map((r) => r.total_ms);
  const totalS = median(idleTotals) / 1000;
  const limitS = res.baselines ? res.baselines.physicalLimitMs / 1000 : NaN;
  const heavy = res.heavy.find((r) => r.mode === 'tpm') ?? res.heavy[0];
  const randTracking = res.tracking.find((t) => t.workload === 'randwrite');
  const b = res.baselines;
  const diskBytesMoved = (ms: number | undefined, bytes: number) => (ms ? bytes / 1e6 / (ms / 1000) : NaN);
  return {
    downtime_ms: { p50: num(percentile(downtimes, 50), 1), max: num(Math.max(...downtimes), 1), n: downtimes.length },
    total_s: num(totalS),
    physical_limit_s: num(limitS),
    total_over_limit: num(totalS / limitS),
    im: {
      bytes: num(res.im?.bytes ?? NaN, 0),
      expected_bytes: num(res.im?.expected_bytes ?? NaN, 0),
      bytes_over_expected: num(res.im ? res.im.bytes / res.im.expected_bytes : NaN),
      time_ratio: num(res.im?.time_ratio ?? NaN),
      blocks_written: res.im?.blocks_written ?? null,
      blocks: res.im?.blocks ?? null,
    },
    tracking_overhead: num(randTracking?.overhead ?? NaN, 4),
    orchestration_overhead_ms: num(median(ok.filter((r) => r.overhead_ms != null).map((r) => r.overhead_ms!)), 0),
    concurrent: {
      count: res.concurrent?.count ?? null,
      failures: res.concurrent?.failures ?? null,
      aggregate_mb_s: num(res.concurrent?.aggregate_mb_s ?? NaN, 1),
      host_limit: res.concurrent?.host_limit ?? null,
      cluster_limit: res.concurrent?.cluster_limit ?? null,
      peak_host_slots: res.concurrent?.peak_host_slots ?? null,
      peak_cluster_slots: res.concurrent?.peak_cluster_slots ?? null,
    },
    guest_violations: Object.values(res.violations).reduce((a, b) => a + b, 0),
    heavy_writer: {
      completed: heavy ? heavy.outcome === 'completed' : null,
      total_over_idle: num(heavy && heavy.outcome === 'completed' ? heavy.total_ms / 1000 / totalS : NaN),
      throttled: heavy?.throttled ?? null,
      downtime_ms: heavy?.downtime_ms ?? null,
      guest_rounds: heavy?.guest_rounds ?? [],
    },
    bandwidth: res.bandwidth
      ? { bytes_per_second: res.bandwidth.bytes_per_second, theoretical_s: num(res.bandwidth.theoretical_s), total_s: num(res.bandwidth.total_s), total_over_theoretical: num(res.bandwidth.total_over_theoretical) }
      : null,
    baselines: b
      ? {
          cp_disk_s: num(b.cpDiskMs / 1000),
          cp_disk_no_fsync_s: num(b.cpDiskCachedMs / 1000),
          cp_memory_s: num(b.cpMemoryMs / 1000),
          raw_tcp_disk_s: num(b.tcpDiskMs / 1000),
          cold_migration_s: num(b.coldMs / 1000),
        }
      : null,
    rates_mb_s: {
      cp_disk: num(b ? diskBytesMoved(b.cpDiskMs, b.diskBytes) : NaN, 0),
      raw_tcp: num(b ? diskBytesMoved(b.tcpDiskMs, b.diskBytes) : NaN, 0),
      // Disk first pass of the idle full tpm migrations: bytes / time the source measured for it.
      migration_first_pass: num(median(ok.filter((r) => r.workload === 'idle' && r.kind === 'full' && r.activities?.copyDiskFirstPass).map((r) => r.disk_bytes / 1e6 / (r.activities!.copyDiskFirstPass.ms / 1000))), 0),
    },
  };
}

export type Summary = ReturnType<typeof summarize>;
export type Measured = ReturnType<typeof measured>;

function cell(xs: number[], digits: number, scale = 1): string {
  const s = spread(xs.map((x) => x / scale));
  if (s.n === 0) return '-';
  const f = (x: number) => x.toFixed(digits);
  return s.n === 1 || s.min === s.max ? f(s.median) : `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cols: string[]) => cols.map((c, i) => (i < 3 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

export function formatReport(res: Results, summary: Summary): string {
  const out: string[] = [];
  const matrix = res.runs.filter((r) => r.scenario === 'matrix');
  const groups = new Map<string, RunRecord[]>();
  for (const r of matrix) {
    const key = `${r.workload}|${r.mode}|${r.kind}`;
    groups.set(key, [...(groups.get(key) ?? []), r]);
  }
  const rows = [...groups.entries()].map(([key, rs]) => {
    const ok = completed(rs);
    const pick = (f: (r: RunRecord) => number | null) => ok.map(f).filter((x): x is number => x != null);
    return [
      ...key.split('|'),
      `${ok.length}/${rs.length}`,
      cell(pick((r) => r.downtime_ms), 0),
      cell(pick((r) => r.freeze_ms), 0),
      cell(pick((r) => r.total_ms), 2, 1000),
      cell(pick((r) => r.disk_bytes), 1, 1e6),
      cell(pick((r) => r.memory_bytes), 1, 1e6),
      cell(pick((r) => r.disk_rounds), 0),
      cell(pick((r) => r.memory_rounds), 0),
      cell(pick((r) => r.postcopy_ms), 0),
      cell(pick((r) => r.on_demand_fetches), 0),
      cell(pick((r) => r.overhead_ms), 0),
      cell(pick((r) => r.skipped_blocks), 0),
    ];
  });
  out.push('Migrations (median, min–max in parentheses; kind "incremental" is the migration back after the full one)');
  out.push(
    table(['workload', 'mode', 'kind', 'ok', 'downtime ms', 'freeze ms', 'total s', 'disk MB', 'mem MB', 'disk rnds', 'mem rnds', 'postcopy ms', 'fetches', 'overhead ms', 'skipped blk'], rows),
  );
  const failed = matrix.filter((r) => r.outcome !== 'completed');
  for (const r of failed) out.push(`  ! ${r.workload} ${r.mode} ${r.kind} #${r.rep}: ${r.outcome}: ${r.error}`);

  const b = res.baselines;
  if (b) {
    out.push('');
    out.push('Baselines on this machine (same run)');
    out.push(`  cp disk image + fsync    ${cell(b.samples.cpDiskMs, 2, 1000)} s  (${(b.diskBytes / 1e6 / (b.cpDiskMs / 1000)).toFixed(0)} MB/s; durable, as the migration makes it)`);
    out.push(`  cp disk image, no fsync  ${cell(b.samples.cpDiskCachedMs, 2, 1000)} s  (${(b.diskBytes / 1e6 / (b.cpDiskCachedMs / 1000)).toFixed(0)} MB/s; may still be in the page cache)`);
    out.push(`  cp memory-sized file     ${cell(b.samples.cpMemoryMs, 2, 1000)} s`);
    out.push(`  physical limit (sum)     ${(b.physicalLimitMs / 1000).toFixed(2)} s`);
    out.push(`  raw TCP copy, 64 KiB     ${cell(b.samples.tcpDiskMs, 2, 1000)} s  (${(b.diskBytes / 1e6 / (b.tcpDiskMs / 1000)).toFixed(0)} MB/s, the data plane's limit)`);
    out.push(`  cold migration           ${(b.coldMs / 1000).toFixed(2)} s total = downtime (stop, copy disk + memory, start)`);
  }
  for (const t of res.tracking) {
    out.push(
      `  tracking ${t.workload.padEnd(9)}       off ${cell(t.offOpsPerSec, 0)} ops/CPU-s, on ${cell(t.onOpsPerSec, 0)} ops/CPU-s: overhead ${(t.overhead * 100).toFixed(2)}%` +
        ` (wall clock: off ${cell(t.offOpsPerWallSec, 0)}, on ${cell(t.onOpsPerWallSec, 0)} ops/s)`,
    );
  }
  out.push('');
  out.push('Other scenarios');
  if (res.im) {
    const im = res.im;
    out.push(
      `  incremental (halted guest, ${im.blocks_written}/${im.blocks} blocks written): ${(im.bytes / 1e6).toFixed(1)} MB sent, expected ${(im.expected_bytes / 1e6).toFixed(1)} MB;` +
        ` ${(im.im_total_ms / 1000).toFixed(2)} s vs full ${(im.full_total_ms / 1000).toFixed(2)} s (ratio ${im.time_ratio.toFixed(2)})`,
    );
  }
  for (const h of res.heavy) {
    out.push(
      `  heavy writer (${h.mode}): ${h.outcome}${h.error ? ` (${h.error})` : ''}, total ${(h.total_ms / 1000).toFixed(2)} s, downtime ${h.downtime_ms ?? '-'} ms, ` +
        `throttled ${h.throttled}, stale at freeze ${h.stale_blocks_at_freeze ?? '-'}, postcopy ${h.postcopy_ms} ms, fetches ${h.on_demand_fetches}`,
      `    disk rounds (blocks, then the guest's rate during the round): ${formatGuestRounds(h.guest_rounds)}`,
    );
  }
  if (res.bandwidth) {
    const bw = res.bandwidth;
    out.push(
      `  bandwidth ${((bw.bytes_per_second * 8) / 1e9).toFixed(2)} Gbit/s: total ${bw.total_s.toFixed(2)} s, theoretical ${bw.theoretical_s.toFixed(2)} s` +
        ` (${bw.sent_theoretical_s.toFixed(2)} s for the bytes actually sent), ratio ${bw.total_over_theoretical.toFixed(2)}`,
    );
  }
  if (res.concurrent) {
    const c = res.concurrent;
    const cr = completed(res.runs.filter((r) => r.scenario === 'concurrent'));
    out.push(
      `  concurrent: ${c.count - c.failures}/${c.count} completed in ${(c.wall_ms / 1000).toFixed(1)} s, ${c.aggregate_mb_s.toFixed(0)} MB/s aggregate;` +
        ` per VM total ${cell(cr.map((r) => r.total_ms), 2, 1000)} s, downtime ${cell(cr.map((r) => r.downtime_ms ?? NaN), 0)} ms;` +
        ` slots at most ${c.peak_host_slots}/${c.host_limit} per host, ${c.peak_cluster_slots}/${c.cluster_limit} in the cluster`,
    );
    for (const e of c.errors.slice(0, 5)) out.push(`    ! ${e}`);
  }
  if (res.qemu) {
    out.push('');
    out.push(`On QEMU ${res.qemu.qemu.version} (${res.qemu.qemu.accel}): Ferry beside QEMU's own mirror + migrate and a plain TCP copy (median, min–max)`);
    out.push(formatQemuTable(res.qemu.rows));
  }
  out.push('');
  out.push(formatTargets(summary.targets));
  out.push('');
  out.push('Summary');
  out.push(JSON.stringify(summary, null, 2));
  return out.join('\n');
}
