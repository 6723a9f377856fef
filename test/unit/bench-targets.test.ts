import { formatTargets, qemuTargets } from '../../bench/targets';
import type { QemuRow } from '../../bench/qemu';

const spread = (median: number | null) => (median === null ? { n: 0, median: NaN, min: NaN, max: NaN } : { n: 3, median, min: median, max: median });

function row(system: QemuRow['system'], workload: QemuRow['workload'], direction: QemuRow['direction'], totalMs: number | null, downtimeMs: number | null): QemuRow {
  return {
    system, workload, direction, runs: 3, failures: 0, total_ms: spread(totalMs), downtime_ms: spread(downtimeMs), hypervisor_downtime_ms: spread(null),
    disk_bytes: spread(null), memory_bytes: spread(null), postcopy_ms: spread(null), violations: 0, limit_ratio: null,
  };
}

it('compares Ferry with QEMU native per workload: downtime, total, and the way back against a second full migration', () => {
  const t = qemuTargets([
    row('tcp', null, null, 7000, null),
    row('ferry', 'idle', 'a→b', 10_000, 200),
    row('ferry', 'idle', 'b→a', 1_000, 150),
    row('qemu', 'idle', 'a→b', 5_000, 250),
    row('ferry', 'randwrite', 'a→b', 12_000, 300),
    row('ferry', 'randwrite', 'b→a', 4_000, 300),
  ]);
  expect(t.qemu_idle_downtime).toMatchObject({ value: 0.8, bound: 1, met: true });
  expect(t.qemu_idle_total).toMatchObject({ value: 2, bound: 1.1, met: false });
  expect(t.qemu_idle_way_back).toMatchObject({ value: 0.2, bound: 0.25, met: true });
  // No native run of randwrite: nothing to compare with, so not met and not missed either.
  expect(t.qemu_randwrite_total).toMatchObject({ value: null, met: null });
  const table = formatTargets(t);
  expect(table).toContain('MISSED');
  expect(table).toContain('not measured');
});
