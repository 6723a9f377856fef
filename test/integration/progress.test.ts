// `ferry status --json` sampled every 200 ms through a whole migration, as a dashboard would: the
// percent never goes back, the rate reads 0 while nothing moves, and the phases come in the order the
// README documents. The link is stalled (1 byte/s) for a while in the middle of the first pass.
import { useCluster, testVm, uniqueHosts, waitForProgress } from '../support/cluster';
import { ferry, type Run } from '../support/cli';
import { MIGRATION_PHASES, type MigrationPhase, type MigrationProgress } from '../../common/migration';
import { RATE_WINDOW_MS } from '../../common/progress';
import { setTimeout as sleep } from 'node:timers/promises';

const [a, b] = uniqueHosts('a', 'b');
jest.setTimeout(600_000);

const t = useCluster([a, b]);

interface Sample {
  atMs: number;
  status: string;
  progress: MigrationProgress | null;
}

const MiB = 1 << 20;
const STALL_MS = 20_000;
/** The phases of a migration that completes, in the documented order (README, "Phases"). */
const COMPLETING: readonly MigrationPhase[] = MIGRATION_PHASES.slice(0, MIGRATION_PHASES.indexOf('completed') + 1);

function isSubsequence(seen: string[], of: readonly string[]): boolean {
  let i = 0;
  for (const s of seen) {
    while (i < of.length && of[i] !== s) i++;
    if (i === of.length) return false;
  }
  return true;
}

it('ferry status --json every 200 ms: percent never goes back, the rate is 0 while nothing moves, the phases in order', async () => {
  const vm = testVm('randwrite', { diskBytes: 24 * MiB, memoryBytes: 4 * MiB, opsPerSecond: 10 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 4 * MiB });

  // Each `ferry status` is a process that takes seconds to start on a busy machine: a new one every
  // 200 ms, a few at a time; each sample carries the time it was read (asOf).
  const samples: Sample[] = [];
  const failures: Run[] = [];
  const running = new Set<Promise<void>>();
  let done = false;
  const sampler = (async () => {
    while (!done) {
      if (running.size < 4) {
        const p: Promise<void> = ferry(['status', vm.vmId, '--json']).then((run) => {
          running.delete(p);
          try {
            const state = JSON.parse(run.stdout) as { asOf: string; status: string; progress: MigrationProgress | null };
            samples.push({ atMs: Date.parse(state.asOf), status: state.status, progress: state.progress });
            if (state.status !== 'RUNNING') done = true;
          } catch {
            failures.push(run);
          }
        });
        running.add(p);
      }
      await sleep(200);
    }
  })();

  await waitForProgress(handle, 'the first pass under way', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 0);
  await handle.setBandwidth(1);
  const stalledAt = Date.now();
  await sleep(STALL_MS);
  const resumedAt = Date.now();
  await handle.setBandwidth(4 * MiB);
  expect((await handle.result()).outcome).toBe('completed');
  await sampler;
  await Promise.all(running);

  expect(failures.map((f) => `${f.code}: ${f.stderr}`)).toEqual([]);
  const seen = samples.filter((s) => s.progress).sort((x, y) => x.atMs - y.atMs);
  const table = seen.map((s) => `${new Date(s.atMs).toISOString().slice(11, 23)} ${s.progress!.phase} ${s.progress!.percent}% ${s.progress!.transferBytesPerSecond} B/s ETA ${s.progress!.etaSeconds}`);
  process.stdout.write(`progress samples (stalled ${new Date(stalledAt).toISOString().slice(11, 23)} to ${new Date(resumedAt).toISOString().slice(11, 23)}):\n${table.join('\n')}\n`);
  expect(seen.length).toBeGreaterThan(10);

  // Never backwards.
  for (let i = 1; i < seen.length; i++) {
    if (seen[i].progress!.percent < seen[i - 1].progress!.percent) throw new Error(`percent went back at sample ${i}:\n${table.join('\n')}`);
  }
  // It moved during the first pass, and only the end is 100.
  expect(seen.some((s) => s.progress!.phase === 'disk-precopy' && s.progress!.percent > 1)).toBe(true);
  expect(seen.filter((s) => s.progress!.percent === 100).every((s) => s.progress!.phase === 'completed')).toBe(true);
  expect(seen[seen.length - 1].progress).toMatchObject({ phase: 'completed', percent: 100 });

  // While the link was stalled (past one rate window and a heartbeat's lag), the rate read 0 and there was no ETA.
  const still = seen.filter((s) => s.atMs > stalledAt + RATE_WINDOW_MS + 2000 && s.atMs < resumedAt);
  expect(still.length).toBeGreaterThan(0);
  for (const s of still) expect([s.progress!.transferBytesPerSecond, s.progress!.etaSeconds]).toEqual([0, null]);
  // And while bytes moved, it read a rate (never the thousand-fold lies of before).
  const moving = seen.filter((s) => (s.progress!.transferBytesPerSecond ?? 0) > 0);
  expect(moving.length).toBeGreaterThan(0);
  expect(moving.every((s) => s.progress!.transferBytesPerSecond! < 10 * MiB)).toBe(true);

  // The phases, in the documented order.
  const phases = seen.map((s) => s.progress!.phase).filter((p, i, all) => i === 0 || all[i - 1] !== p);
  if (!isSubsequence(phases, COMPLETING)) throw new Error(`phases out of order: ${phases.join(' → ')}\n${table.join('\n')}`);
});
