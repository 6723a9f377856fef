// Smoke test of `npm run bench -- --quick` (two workloads, one mode, 4 concurrent VMs, to keep it short): it
// runs to the end on the jest run's Temporal server and writes a JSON summary with every field the issue names. Timings are not asserted (shared CI machines).
// From the sources: its build step would race the package test's `npm run build` of the same dist/.
import { spawn, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { nodeEntryArgs } from '../../common/node-entry';
import { testTemporalAddress } from '../support/temporal';

jest.setTimeout(600_000);

const REPO = path.resolve(__dirname, '..', '..');
let child: ChildProcess | null = null;

// If the test times out, the benchmark stops too (SIGTERM: it stops its agents and VMs itself).
afterAll(() => {
  if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
});

function runBench(args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    child = spawn(process.execPath, [...nodeEntryArgs(path.join(REPO, 'bench', 'main')), ...args], { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-20_000)));
    child.once('error', reject);
    child.once('exit', (code) => resolve({ code, stderr }));
  });
}

it('bench --quick writes a summary with every field, as numbers', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-bench-smoke-'));
  try {
    const file = path.join(dir, 'bench.json');
    // The side-by-side on QEMU (npm run bench:qemu, the same code) is left out: minutes under TCG.
    const only = ['baselines', 'tracking', 'matrix', 'im', 'heavy', 'bandwidth', 'concurrent'].join(',');
    const { code, stderr } = await runBench(['--quick', '--only', only, '--workloads', 'idle,randwrite', '--modes', 'tpm', '--concurrent', '4', '--json', file, '--temporal-address', testTemporalAddress(), '--from-sources']);
    if (code !== 0) throw new Error(`bench exited with ${code}:\n${stderr}`);
    const out = JSON.parse(await fs.readFile(file, 'utf8')) as { summary: Record<string, unknown>; runs: unknown[] };
    const s = out.summary;
    const at = (p: string): unknown => p.split('.').reduce<unknown>((o, k) => (o as Record<string, unknown> | undefined)?.[k], s);
    const numeric = [
      'downtime_ms.p50',
      'downtime_ms.max',
      'total_s',
      'physical_limit_s',
      'total_over_limit',
      'im.bytes',
      'im.expected_bytes',
      'im.time_ratio',
      'tracking_overhead',
      'orchestration_overhead_ms',
      'concurrent.count',
      'concurrent.failures',
      'concurrent.aggregate_mb_s',
      'heavy_writer.total_over_idle',
    ];
    for (const p of numeric) expect([p, typeof at(p)]).toEqual([p, 'number']);
    expect(typeof at('heavy_writer.completed')).toBe('boolean');
    const rounds = at('heavy_writer.guest_rounds') as { blocks: number; ops_per_second: number | null; throttle: number | null }[];
    expect(rounds.length).toBeGreaterThan(0);
    expect(rounds.every((r) => typeof r.blocks === 'number' && typeof r.throttle === 'number')).toBe(true);
    expect(rounds.some((r) => typeof r.ops_per_second === 'number')).toBe(true);
    expect(out.runs.length).toBeGreaterThan(0);
    // Every target of the simulator has its value and a verdict; none is left unmeasured in this run.
    const targets = at('targets') as Record<string, { value: number | null; bound: number; met: boolean | null }>;
    for (const name of ['downtime_p50_ms', 'downtime_max_ms', 'total_over_limit', 'tracking_overhead', 'im_bytes_over_expected', 'orchestration_overhead_ms', 'concurrent_failures']) {
      expect([name, typeof targets[name]?.value, typeof targets[name]?.met]).toEqual([name, 'number', 'boolean']);
      expect(targets[name].met).toBe(targets[name].value! <= targets[name].bound);
    }
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
