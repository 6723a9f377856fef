// The progress model (common/progress.ts) on a recorded migration and on the cases it must get right.
// The recording (test/fixtures/progress/migration.json, re-recorded by record.ts beside it) is what a
// client saw every 250 ms of a real migration at 2 MiB/s, stalled at 1 byte/s for 8 s in its first pass.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import {
  PROGRESS_STAGES,
  RATE_WINDOW_MS,
  SAMPLE_FRESH_MS,
  furthest,
  liveProgress,
  percentOf,
  transferRate,
  type ProgressPlan,
  type ProgressStage,
} from '../../common/progress';
import type { RecordedView } from '../fixtures/progress/record';

const MiB = 1 << 20;
const views = JSON.parse(readFileSync(path.join(__dirname, '..', 'fixtures', 'progress', 'migration.json'), 'utf8')) as RecordedView[];
const shown = views.map((v) => ({ atMs: v.atMs, p: liveProgress(v.published, v.running, v.atMs) }));

describe('a recorded migration, as a client saw it', () => {
  it('percent never goes back, moves during the first pass, and reaches 100 only at the end', () => {
    for (let i = 1; i < shown.length; i++) expect([i, shown[i].p.percent]).toEqual([i, Math.max(shown[i].p.percent, shown[i - 1].p.percent)]);
    const firstPass = new Set(shown.filter((s) => s.p.phase === 'disk-precopy').map((s) => s.p.percent));
    expect(firstPass.size).toBeGreaterThanOrEqual(4);
    expect(shown.filter((s) => s.p.percent === 100).map((s) => s.p.phase)).toEqual(expect.arrayContaining(['completed']));
    expect(shown.filter((s) => s.p.percent === 100).every((s) => s.p.phase === 'completed')).toBe(true);
  });

  it('the rate reads 0, and there is no ETA, once nothing has moved for a window; it never reads far above the link', () => {
    let lastBytes = -1;
    let changedAt = 0;
    let stalled = 0;
    for (const { atMs, p } of shown) {
      const bytes = p.disk.sentBytes + p.memory.sentBytes;
      if (bytes !== lastBytes) [lastBytes, changedAt] = [bytes, atMs];
      // The source heartbeats on while its link stalls: the window ends at its latest sample, a second old at most.
      if (p.phase === 'disk-precopy' && atMs - changedAt > RATE_WINDOW_MS + 1500) {
        stalled++;
        expect(p.transferBytesPerSecond).toBe(0);
        expect(p.etaSeconds).toBeNull();
      }
      // 2 MiB/s, and a new session's first 4 MiB message crosses at once (the limiter's debt).
      expect(p.transferBytesPerSecond ?? 0).toBeLessThan(5 * MiB);
    }
    expect(stalled).toBeGreaterThan(3);
  });

  it('gives an ETA only with a rate, and the rate only once a second of samples is there', () => {
    for (const { p } of shown) {
      if (p.transferBytesPerSecond === null || p.transferBytesPerSecond === 0) expect(p.etaSeconds).toBeNull();
      else expect(Number.isInteger(p.etaSeconds) && p.etaSeconds! >= 0).toBe(true);
    }
    expect(shown[0].p.transferBytesPerSecond).toBeNull();
    const moving = shown.filter((s) => s.p.phase === 'disk-precopy' && (s.p.transferBytesPerSecond ?? 0) > 0);
    expect(moving.length).toBeGreaterThan(3);
  });

  it('adds the running transfer\'s acknowledged bytes to what the workflow published', () => {
    const during = views.find((v) => v.running?.activity === 'copyDiskFirstPass' && (v.running.heartbeat?.bytes ?? 0) > 0)!;
    const p = liveProgress(during.published, during.running, during.atMs);
    expect(p.disk.sentBytes).toBe(during.published.disk.sentBytes + during.running!.heartbeat!.bytes);
    expect(p.percent).toBeGreaterThan(during.published.percent);
  });
});

describe('percent', () => {
  const plan: ProgressPlan = { diskBytes: 1 << 30, memoryBytes: 256 * MiB, blockBytes: 65536, postcopy: true };
  const position = fc.record({ stage: fc.constantFrom(...PROGRESS_STAGES), round: fc.nat(40), stepDone: fc.double({ min: 0, max: 1, noNaN: true }) });
  const order = (s: ProgressStage) => PROGRESS_STAGES.indexOf(s);

  it('only grows along the stages, the rounds and the steps, and stays within 0..100', () => {
    fc.assert(
      fc.property(position, position, (a, b) => {
        const pa = percentOf(plan, a);
        const pb = percentOf(plan, b);
        expect(pa).toBeGreaterThanOrEqual(0);
        expect(pa).toBeLessThanOrEqual(100);
        const rounds = a.stage === 'disk-rounds' || a.stage === 'converging';
        const laterStep = rounds ? b.round > a.round || (b.round === a.round && b.stepDone >= a.stepDone) : b.stepDone >= a.stepDone;
        const later = order(b.stage) > order(a.stage) || (a.stage === b.stage && laterStep);
        if (later) expect(pb).toBeGreaterThanOrEqual(pa - 1e-9);
      }),
      { seed: 15, numRuns: 2000 },
    );
  });

  it('shares the two passes by their sizes, and leaves no band for a postcopy in precopy mode', () => {
    const end = (stage: ProgressStage, p = plan) => percentOf(p, { stage, round: 0, stepDone: 1 });
    expect(end('disk-first-pass') - percentOf(plan, { stage: 'disk-first-pass', round: 0, stepDone: 0 })).toBeCloseTo(4 * (percentOf(plan, { stage: 'memory', round: 0, stepDone: 1 }) - percentOf(plan, { stage: 'memory', round: 0, stepDone: 0 })));
    const precopy = { ...plan, postcopy: false };
    expect(percentOf(precopy, { stage: 'postcopy', round: 0, stepDone: 1 })).toBeCloseTo(percentOf(precopy, { stage: 'postcopy', round: 0, stepDone: 0 }));
    expect(percentOf(plan, { stage: 'done', round: 0, stepDone: 0 })).toBe(100);
  });
});

describe('rate', () => {
  const at = (s: number, bytes: number) => ({ atMs: s * 1000, bytes });

  it('is unknown before a second of samples, then the bytes over the window', () => {
    expect(transferRate([], 0)).toBeNull();
    expect(transferRate([at(0, 0), at(0.5, MiB)], 500)).toBeNull();
    expect(transferRate([at(0, 0), at(1, MiB), at(2, 2 * MiB), at(3, 3 * MiB)], 3000)).toBe(MiB);
    // A finished transfer is a sample at its start and one at its end: its bytes spread over its time.
    expect(transferRate([at(0, 0), at(10, 10 * MiB)], 10_000)).toBe(MiB);
  });

  it('falls to 0 when nothing moves, whether the samples go on (a stalled link) or stop (a silent host)', () => {
    const stalled = [at(0, 0), at(1, MiB), ...[2, 3, 4, 5, 6, 7, 8].map((s) => at(s, 2 * MiB))];
    expect(transferRate(stalled, 8000)).toBe(0);
    const silent = [at(0, 0), at(1, MiB), at(2, 2 * MiB)];
    expect(transferRate(silent, 2500)).toBe(MiB); // a heartbeat's lag: still the last rate
    expect(transferRate(silent, 2000 + SAMPLE_FRESH_MS + RATE_WINDOW_MS + 1)).toBe(0);
  });

  it('does not count down when a retried transfer reports less again', () => {
    expect(transferRate([at(0, 0), at(1, 4 * MiB), at(2, MiB), at(3, 4 * MiB)], 3000)).toBeGreaterThanOrEqual(0);
    expect(transferRate([at(0, 4 * MiB), at(1, 0), at(2, 0)], 2000)).toBe(0);
  });

  it('heartbeats keep the furthest position a retried attempt reached', () => {
    expect(furthest({ cursor: 100, bytes: 5, items: 3 }, { cursor: 10, bytes: 50, items: 1 })).toEqual({ cursor: 100, bytes: 50, items: 3 });
  });
});
