// `npm run bench:qemu`: Ferry migrating a real QEMU guest, against the physical limit (a plain TCP
// copy of the same bytes) and against QEMU's own mirror + migrate with no Ferry (qemu-peer.ts),
// all in the same run on the same machine. See bench/README.md ("QEMU: Ferry against QEMU's own
// migration") for what each number means.
//   npx tsx bench/qemu.ts [--quick] [--disk-mib 1024] [--memory-mib 512] [--reps 3] [--ops 200] [--json FILE]
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Command } from 'commander';
import { FerryClient } from '../client/ferry-client';
import { LocalCluster } from '../harness/cluster';
import { probeAccel } from '../hypervisor/qemu/accel-probe';
import type { GuestWorkload } from '../hypervisor/qemu/guest-params';
import { findQemuAssets } from '../scripts/qemu-assets';
import { ensureTemporalCli, startDevServer } from '../scripts/temporal-cli';
import { timeTcp, writeFresh } from './baselines';
import { resultWithin } from './scenarios';
import { buildDist } from './compiled';
import { Running, startRun, stopOnSignals } from './run-context';
import { PEER_MIGRATION_PARAMETERS, runPeer, type PeerAssets } from './qemu-peer';
import { spread, type Spread } from './stats';
import { formatTargets, qemuTargets } from './targets';

const MiB = 1024 * 1024;
const [A, B] = ['qa', 'qb'];
const WORKLOADS = ['idle', 'randwrite'] as const;
type BenchWorkload = (typeof WORKLOADS)[number];
const SEED = 7;
/** The guest reads its whole disk: seconds for 1 GiB under TCG, even on a loaded machine. */
const VERIFY_TIMEOUT_MS = 5 * 60_000;

type System = 'tcp' | 'ferry' | 'qemu';
type Direction = 'a→b' | 'b→a';

export interface QemuBenchFlags {
  quick: boolean;
  json?: string;
  diskMib?: string;
  memoryMib?: string;
  reps?: string;
  ops?: string;
  workloads?: string;
  systems?: string;
  keepDir: boolean;
  fromSources: boolean;
}

export interface QemuBenchConfig {
  diskBytes: number;
  memoryBytes: number;
  reps: number;
  opsPerSecond: number;
  workloads: BenchWorkload[];
  systems: System[];
  migrationTimeoutMs: number;
}

/** One measured run of one system. */
export interface QemuRun {
  system: System;
  workload: BenchWorkload | null;
  direction: Direction | null;
  rep: number;
  ok: boolean;
  error: string | null;
  total_ms: number;
  /** The longest gap between guest heartbeats, measured from outside. */
  downtime_ms: number | null;
  /** QEMU's own `downtime`. */
  hypervisor_downtime_ms: number | null;
  disk_bytes: number;
  memory_bytes: number;
  postcopy_ms: number | null;
  incremental: boolean | null;
  /** The guest's read check after the run (null: not run). */
  violations: number | null;
  /** Everything else the system reported (Ferry's report, the peer's phase times). */
  detail: Record<string, unknown>;
}

export interface QemuRow {
  system: System;
  workload: BenchWorkload | null;
  direction: Direction | null;
  runs: number;
  failures: number;
  total_ms: Spread;
  downtime_ms: Spread;
  hypervisor_downtime_ms: Spread;
  disk_bytes: Spread;
  memory_bytes: Spread;
  postcopy_ms: Spread;
  violations: number;
  /** median total / median time of the physical limit. */
  limit_ratio: number | null;
}

function positive(value: string | undefined, fallback: number, what: string): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${what} must be a positive number, got ${JSON.stringify(value)}`);
  return n;
}

function list<T extends string>(value: string | undefined, allowed: readonly T[], what: string): T[] {
  if (!value) return [...allowed];
  const items = value.split(',').map((s) => s.trim()) as T[];
  for (const i of items) if (!allowed.includes(i)) throw new Error(`unknown ${what} ${JSON.stringify(i)}: use ${allowed.join(', ')}`);
  return items;
}

export function qemuBenchConfig(f: Partial<QemuBenchFlags> & { quick: boolean }): QemuBenchConfig {
  const diskBytes = positive(f.diskMib, f.quick ? 128 : 1024, 'disk-mib') * MiB;
  const memoryBytes = positive(f.memoryMib, f.quick ? 128 : 512, 'memory-mib') * MiB;
  if (diskBytes % MiB || memoryBytes % MiB) throw new Error('--disk-mib and --memory-mib must be whole numbers of MiB');
  return {
    diskBytes,
    memoryBytes,
    reps: Math.round(positive(f.reps, f.quick ? 1 : 3, 'reps')),
    opsPerSecond: Math.round(positive(f.ops, 200, 'ops')),
    workloads: list(f.workloads, WORKLOADS, 'workload'),
    systems: list<System>(f.systems, ['tcp', 'ferry', 'qemu'], 'system'),
    // TCG on a shared machine: generous, as the rest of Ferry's QEMU tests are.
    migrationTimeoutMs: 30 * 60_000,
  };
}

const emptyRun = (system: System, workload: BenchWorkload | null, direction: Direction | null, rep: number): QemuRun => ({
  system,
  workload,
  direction,
  rep,
  ok: false,
  error: null,
  total_ms: NaN,
  downtime_ms: null,
  hypervisor_downtime_ms: null,
  disk_bytes: 0,
  memory_bytes: 0,
  postcopy_ms: null,
  incremental: null,
  violations: null,
  detail: {},
});

const rate = (cfg: QemuBenchConfig, w: BenchWorkload): number => (w === 'idle' ? 0 : cfg.opsPerSecond);

class QemuBench {
  readonly runs: QemuRun[] = [];

  constructor(
    private readonly cfg: QemuBenchConfig,
    private readonly root: string,
    private readonly say: (line: string) => void,
  ) {}

  private record(r: QemuRun): QemuRun {
    this.runs.push(r);
    const what = r.ok
      ? `total ${(r.total_ms / 1000).toFixed(2)} s, downtime ${r.downtime_ms?.toFixed(0) ?? '-'} ms (QEMU ${r.hypervisor_downtime_ms ?? '-'} ms), disk ${(r.disk_bytes / 1e6).toFixed(0)} MB, memory ${(r.memory_bytes / 1e6).toFixed(0)} MB${r.violations === null ? '' : `, ${r.violations} violations`}`
      : `FAILED: ${r.error ?? ''}`;
    this.say(`  ${r.system} ${r.workload ?? ''} ${r.direction ?? ''} #${r.rep}: ${what}`);
    return r;
  }

  /** A plain copy of disk + memory bytes over loopback TCP to another process. */
  async physicalLimit(): Promise<void> {
    const bytes = this.cfg.diskBytes + this.cfg.memoryBytes;
    const file = path.join(this.root, 'limit.img');
    await writeFresh(file, bytes);
    try {
      for (let rep = 1; rep <= this.cfg.reps; rep++) {
        const r = emptyRun('tcp', null, null, rep);
        try {
          r.total_ms = await timeTcp(file, `${file}.tcp`);
          Object.assign(r, { ok: true, disk_bytes: this.cfg.diskBytes, memory_bytes: this.cfg.memoryBytes });
        } catch (err) {
          r.error = (err as Error).message;
        }
        this.record(r);
      }
    } finally {
      await fs.rm(file, { force: true });
    }
  }

  /** A Ferry VM per workload on host a: `reps` times tpm a→b (full), then back b→a (incremental). */
  async ferry(ferry: FerryClient): Promise<void> {
    for (const workload of this.cfg.workloads) {
      const vmId = `qbench-${workload}-${process.pid}`;
      this.say(`ferry: creating ${vmId} on ${A} (${workload}${workload === 'idle' ? '' : ` at ${this.cfg.opsPerSecond} ops/s`})`);
      try {
        await ferry.hostCommand(A, 'vmCreate', { vmId, diskBytes: this.cfg.diskBytes, memoryBytes: this.cfg.memoryBytes, workload, seed: SEED, opsPerSecond: rate(this.cfg, workload), fill: true });
        await this.guestWorking(ferry, A, vmId, workload);
        let at = A;
        for (let rep = 1; rep <= this.cfg.reps; rep++) {
          const out = await this.ferryRun(ferry, vmId, workload, rep, A, B);
          if (!out.ok) break;
          at = B;
          const back = await this.ferryRun(ferry, vmId, workload, rep, B, A);
          if (!back.ok) break;
          at = A;
        }
        if (at !== A) this.say(`  ${vmId} stays on ${at} until cleanup`);
      } catch (err) {
        const r = emptyRun('ferry', workload, null, 0);
        r.error = `setting up ${vmId}: ${(err as Error).message}`;
        this.record(r);
      } finally {
        for (const host of [A, B]) await ferry.hostCommand(host, 'vmDestroy', { vmId }).catch(() => undefined);
        for (const host of [A, B]) await ferry.hostCommand(host, 'baseDelete', { vmId }).catch(() => undefined);
      }
    }
  }

  private async guestWorking(ferry: FerryClient, host: string, vmId: string, workload: BenchWorkload): Promise<void> {
    const until = Date.now() + 300_000;
    for (;;) {
      const s = await ferry.hostCommand(host, 'vmInspect', { vmId });
      if (s.guest && (workload === 'idle' || s.guest.ops > 20)) return;
      if (Date.now() > until) throw new Error(`the guest of ${vmId} did not start working on ${host} within 300 s (see its console log under the agent's home)`);
      await sleep(500);
    }
  }

  private async ferryRun(ferry: FerryClient, vmId: string, workload: BenchWorkload, rep: number, from: string, to: string): Promise<QemuRun> {
    const direction: Direction = from === A ? 'a→b' : 'b→a';
    const r = emptyRun('ferry', workload, direction, rep);
    try {
      const handle = await ferry.migrate({ vmId, sourceHost: from, destinationHosts: [to], mode: 'tpm', incremental: direction === 'a→b' ? 'off' : 'auto' });
      const report = await resultWithin(handle, this.cfg.migrationTimeoutMs);
      if (report.outcome !== 'completed') throw new Error(`the migration was rolled back: ${report.reason ?? 'no reason given'}`);
      Object.assign(r, {
        total_ms: report.totalMs,
        downtime_ms: report.downtimeMs,
        hypervisor_downtime_ms: report.hypervisorDowntimeMs,
        disk_bytes: report.diskBytesSent,
        memory_bytes: report.memoryBytesSent,
        postcopy_ms: report.postcopyMs,
        incremental: report.incremental,
        detail: { report },
      });
      const verified = await this.verify(ferry, to, vmId);
      r.violations = verified.violations;
      r.detail.verify = verified;
      r.ok = verified.violations === 0;
      if (!r.ok) r.error = `the guest found ${verified.violations} violations on ${to}: ${verified.details ?? ''}`;
    } catch (err) {
      r.error = (err as Error).message;
    }
    return this.record(r);
  }

  /**
   * vmVerify, bounded: the hostCommand workflow retries a timed-out vmVerify activity with no end,
   * so a guest that does not answer would hold the benchmark forever.
   */
  private async verify(ferry: FerryClient, host: string, vmId: string): Promise<{ violations: number; details?: string }> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`vmVerify of ${vmId} on ${host} gave no answer within ${VERIFY_TIMEOUT_MS / 1000} s`)), VERIFY_TIMEOUT_MS);
    });
    try {
      return await Promise.race([ferry.hostCommand(host, 'vmVerify', { vmId }), timeout]);
    } catch (err) {
      const s = await ferry.hostCommand(host, 'vmInspect', { vmId }).catch(() => null);
      const guest = s?.guest ? `the guest's last report: ${JSON.stringify(s.guest)}` : 'no report from the guest';
      throw new Error(`${(err as Error).message}; VM state ${s?.state ?? 'unknown'}, ${guest}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /** QEMU's own mirror + migrate, a fresh pair of bare QEMUs per run (there is no incremental way back). */
  async peer(assets: PeerAssets, accel: 'kvm' | 'tcg'): Promise<void> {
    for (const workload of this.cfg.workloads) {
      for (let rep = 1; rep <= this.cfg.reps; rep++) {
        this.say(`qemu: bare mirror + migrate of a ${workload} guest, #${rep}`);
        const r = emptyRun('qemu', workload, 'a→b', rep);
        const dir = await fs.mkdtemp(path.join(this.root, `peer-${workload}-${rep}-`));
        try {
          const p = await runPeer({
            assets,
            accel,
            dir,
            diskBytes: this.cfg.diskBytes,
            memoryBytes: this.cfg.memoryBytes,
            workload: workload satisfies GuestWorkload,
            opsPerSecond: rate(this.cfg, workload),
            seed: SEED,
            timeoutMs: this.cfg.migrationTimeoutMs,
            log: this.say,
          });
          const violations = p.verify.violations + p.verify.unreadable;
          Object.assign(r, {
            ok: violations === 0,
            error: violations === 0 ? null : `the guest found ${p.verify.violations} violations and ${p.verify.unreadable} unreadable blocks on the destination`,
            total_ms: p.totalMs,
            downtime_ms: p.heartbeatDowntimeMs,
            hypervisor_downtime_ms: p.qemuDowntimeMs,
            disk_bytes: p.diskBytes,
            memory_bytes: p.memoryBytes,
            violations,
            detail: { switchover_gap_ms: p.switchoverGapMs, mirror_ms: p.mirrorMs, migrate_ms: p.migrateMs, mirror_job_bytes: p.mirrorJobBytes, verify: p.verify },
          });
        } catch (err) {
          r.error = (err as Error).message;
        } finally {
          await fs.rm(dir, { recursive: true, force: true });
        }
        this.record(r);
      }
    }
  }
}

function summarize(runs: QemuRun[]): QemuRow[] {
  const keys = new Map<string, QemuRun[]>();
  for (const r of runs) {
    const key = `${r.system}|${r.workload ?? ''}|${r.direction ?? ''}`;
    keys.set(key, [...(keys.get(key) ?? []), r]);
  }
  const limit = spread(runs.filter((r) => r.system === 'tcp' && r.ok).map((r) => r.total_ms)).median;
  return [...keys.values()].map((group) => {
    const ok = group.filter((r) => r.ok);
    const of = (pick: (r: QemuRun) => number | null) => spread(ok.map(pick).filter((x): x is number => x !== null));
    const total = of((r) => r.total_ms);
    return {
      system: group[0].system,
      workload: group[0].workload,
      direction: group[0].direction,
      runs: group.length,
      failures: group.length - ok.length,
      total_ms: total,
      downtime_ms: of((r) => r.downtime_ms),
      hypervisor_downtime_ms: of((r) => r.hypervisor_downtime_ms),
      disk_bytes: of((r) => r.disk_bytes),
      memory_bytes: of((r) => r.memory_bytes),
      postcopy_ms: of((r) => r.postcopy_ms),
      violations: group.reduce((n, r) => n + (r.violations ?? 0), 0),
      limit_ratio: Number.isFinite(limit) && total.n > 0 ? total.median / limit : null,
    };
  });
}

export function formatQemuTable(rows: QemuRow[]): string {
  const range = (s: Spread, scale: number, digits: number): string => {
    if (s.n === 0) return '-';
    const f = (x: number) => (x / scale).toFixed(digits);
    return s.n === 1 || s.min === s.max ? f(s.median) : `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
  };
  const header = ['system', 'workload', 'dir', 'ok/runs', 'total s', '× limit', 'downtime ms', 'QEMU downtime ms', 'disk MB', 'memory MB', 'postcopy ms', 'violations'];
  const body = rows.map((r) => [
    r.system === 'tcp' ? 'tcp copy' : r.system,
    r.workload ?? '-',
    r.direction ?? '-',
    `${r.runs - r.failures}/${r.runs}`,
    range(r.total_ms, 1000, 2),
    r.limit_ratio === null ? '-' : r.limit_ratio.toFixed(2),
    range(r.downtime_ms, 1, 0),
    range(r.hypervisor_downtime_ms, 1, 0),
    range(r.disk_bytes, 1e6, 0),
    range(r.memory_bytes, 1e6, 0),
    range(r.postcopy_ms, 1, 0),
    r.system === 'tcp' ? '-' : String(r.violations),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(' | ')} |`;
  return [line(header), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...body.map(line)].join('\n');
}

export interface QemuBenchResult {
  rows: QemuRow[];
  runs: QemuRun[];
  qemu: { version: string; accel: 'kvm' | 'tcg'; accel_reason: string; kernel: string; guest: string; peer_migration_parameters: typeof PEER_MIGRATION_PARAMETERS };
}

/**
 * The side-by-side run: the physical limit, Ferry there and back, QEMU's own mirror + migrate. `root`
 * is a working directory the caller removes; `fromSources` runs the agents through tsx (no build).
 */
export async function runQemuBench(cfg: QemuBenchConfig, o: { root: string; say: (line: string) => void; fromSources: boolean; running: Running }): Promise<QemuBenchResult> {
  const { root, say } = o;
  const assets = await findQemuAssets({ log: (l) => say(`  ${l}`) });
  if ('missing' in assets) throw new Error(`QEMU or the guest is missing: ${assets.missing} (npm run setup:qemu provisions them)`);
  const accel = await probeAccel(assets);
  say(`QEMU: disk ${cfg.diskBytes / MiB} MiB, memory ${cfg.memoryBytes / MiB} MiB, ${cfg.reps} rep(s), workloads ${cfg.workloads.join(',')} (randwrite at ${cfg.opsPerSecond} ops/s), systems ${cfg.systems.join(',')}; QEMU ${assets.qemuVersion} under ${accel.accel} (${accel.reason}); load average ${os.loadavg()[0].toFixed(1)}; working directory ${root}`);
  const bench = new QemuBench(cfg, root, say);
  if (cfg.systems.includes('tcp')) {
    say(`physical limit: ${(cfg.diskBytes + cfg.memoryBytes) / MiB} MiB over loopback TCP to another process`);
    await bench.physicalLimit();
  }
  if (cfg.systems.includes('ferry')) {
    say('starting a Temporal dev server (headless, in memory)');
    const cli = await ensureTemporalCli({ log: (l) => say(`  ${l}`) });
    const server = await startDevServer({ cliPath: cli.path, uiPort: null });
    const stopServer = o.running.add(() => server.stop());
    const clusterRoot = path.join(root, 'cluster');
    say(`starting host agents ${A} and ${B} with FERRY_HYPERVISOR=qemu`);
    try {
      if (!o.fromSources) await buildDist(say);
      const cluster = await LocalCluster.start({ temporalAddress: server.address, hosts: [A, B], root: clusterRoot, env: { FERRY_HYPERVISOR: 'qemu' }, compiled: !o.fromSources });
      const stopCluster = o.running.add(() => cluster.stop());
      await bench.ferry(cluster.ferryClient()).finally(stopCluster);
    } finally {
      await stopServer();
    }
  }
  if (cfg.systems.includes('qemu')) await bench.peer(assets, accel.accel);
  for (const r of bench.runs.filter((x) => !x.ok)) say(`ERROR: ${r.system} ${r.workload ?? ''} ${r.direction ?? ''} #${r.rep}: ${r.error ?? 'failed'}`);
  return {
    rows: summarize(bench.runs),
    runs: bench.runs,
    qemu: { version: assets.qemuVersion, accel: accel.accel, accel_reason: accel.reason, kernel: assets.kernelVersion, guest: assets.guestVersion, peer_migration_parameters: PEER_MIGRATION_PARAMETERS },
  };
}

async function main(f: QemuBenchFlags): Promise<number> {
  const cfg = qemuBenchConfig(f);
  const run = startRun();
  const say = run.say;
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-bench-qemu-'));
  const running = new Running();
  const cleanup = async () => {
    await running.stopAll();
    if (!f.keepDir) await fs.rm(root, { recursive: true, force: true }).catch(() => undefined);
  };
  stopOnSignals(say, cleanup);
  try {
    const res = await runQemuBench(cfg, { root, say, fromSources: f.fromSources, running });
    process.stdout.write(`${formatQemuTable(res.rows)}\n`);
    const targets = qemuTargets(res.rows);
    process.stdout.write(`\n${formatTargets(targets)}\n`);
    const failed = res.runs.filter((r) => !r.ok);
    if (f.json) {
      await fs.writeFile(f.json, `${JSON.stringify({ meta: { ...run.meta(), qemu: res.qemu, config: cfg }, targets, rows: res.rows, runs: res.runs }, null, 2)}\n`);
      say(`wrote ${f.json}`);
    }
    say(`done in ${run.elapsedS().toFixed(0)} s${failed.length ? `; ${failed.length} run(s) failed` : ''}`);
    return failed.length ? 1 : 0;
  } finally {
    await cleanup();
  }
}

const program = new Command('ferry-bench-qemu')
  .description("Ferry migrating a real QEMU guest, against a plain TCP copy of the same bytes and QEMU's own mirror + migrate, in the same run")
  .option('--quick', '128 MiB disk, 128 MiB memory, 1 repetition', false)
  .option('--json <file>', 'write every run and the summary as JSON')
  .option('--disk-mib <n>', 'VM disk size in MiB, filled (default 1024; 128 with --quick)')
  .option('--memory-mib <n>', 'VM memory size in MiB (default 512; 128 with --quick)')
  .option('--reps <n>', 'repetitions per system, workload and direction (default 3; 1 with --quick)')
  .option('--ops <n>', 'randwrite guest operations per second (default 200)')
  .option('--workloads <list>', `comma-separated, from ${WORKLOADS.join(',')}`)
  .option('--systems <list>', 'comma-separated, from tcp,ferry,qemu (default all)')
  .option('--from-sources', 'run the agents through tsx from the sources instead of the compiled dist/ (no build step)', false)
  .option('--keep-dir', 'keep the working directory (agent homes, logs) for inspection', false)
  .action(async (f: QemuBenchFlags) => {
    process.exitCode = await main(f);
  });

if (require.main === module) {
  program.parseAsync(process.argv).catch((err: Error) => {
    process.stderr.write(`ferry bench:qemu failed: ${err.stack ?? err.message}\n`);
    process.exit(1);
  });
}
