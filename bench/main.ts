// `npm run bench`: real migrations (Temporal server, host agents, VM processes) against limits of
// this machine measured in the same run. See bench/README.md for what each number means.
//   npx tsx bench/main.ts [--quick] [--json FILE] [--charts DIR] [--disk-mib 1024] [--memory-mib 256] [--reps 5]
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { Command } from 'commander';
import { LocalCluster } from '../harness/cluster';
import type { MigrationMode } from '../common/migration';
import { WORKLOADS, type Workload } from '../common/types';
import { ensureTemporalCli, startDevServer, type DevServer } from '../scripts/temporal-cli';
import { measureBaselines } from './baselines';
import { buildDist } from './compiled';
import { Running, startRun, stopOnSignals } from './run-context';
import { qemuBenchConfig, runQemuBench } from './qemu';
import { findQemuAssets } from '../scripts/qemu-assets';
import { writeCharts } from './charts';
import { formatReport, summarize, type Results } from './report';
import { Bench, type ScenarioConfig } from './scenarios';
import { measureTracking } from './tracking';
import { measureNetwork, formatNetwork, type NetworkRun } from './network';
import { runAdmissionLoad, type AdmissionLoadResult } from './admission/load';

const MiB = 1024 * 1024;
const HOSTS = ['h1', 'h2', 'h3', 'h4'];
const SCENARIOS = ['baselines', 'tracking', 'matrix', 'im', 'heavy', 'bandwidth', 'concurrent', 'qemu', 'network', 'admission'] as const;
type ScenarioName = (typeof SCENARIOS)[number];
/**
 * Run when no --only is given; `qemu` (Ferry beside QEMU's own migration, bench/qemu.ts) only where
 * QEMU is provisioned, `network` (needs root) and `admission` (a load test) only when named.
 */
const DEFAULT_SCENARIOS: readonly ScenarioName[] = ['baselines', 'tracking', 'matrix', 'im', 'heavy', 'bandwidth', 'concurrent', 'qemu'];

interface Flags {
  quick: boolean;
  json?: string;
  charts?: string;
  diskMib?: string;
  memoryMib?: string;
  reps?: string;
  ops?: string;
  workloads?: string;
  modes?: string;
  concurrent?: string;
  hostLimit: string;
  clusterLimit: string;
  bandwidth: string;
  imPercent: string;
  only?: string;
  temporalAddress?: string;
  keepDir: boolean;
  fromSources: boolean;
  cpuProf?: string;
}

function list<T extends string>(value: string | undefined, allowed: readonly T[], fallback: readonly T[], what: string): T[] {
  if (!value) return [...fallback];
  const items = value.split(',').map((s) => s.trim()) as T[];
  for (const i of items) if (!allowed.includes(i)) throw new Error(`unknown ${what} ${JSON.stringify(i)}: use ${allowed.join(', ')}`);
  return items;
}

function positive(value: string | undefined, fallback: number, what: string): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${what} must be a positive number, got ${JSON.stringify(value)}`);
  return n;
}

function config(f: Flags): { cfg: ScenarioConfig; scenarios: ScenarioName[] } {
  const q = f.quick;
  const diskBytes = positive(f.diskMib, q ? 64 : 1024, 'disk-mib') * MiB;
  const memoryBytes = positive(f.memoryMib, q ? 16 : 256, 'memory-mib') * MiB;
  const count = positive(f.concurrent, q ? 8 : 50, 'concurrent');
  const cfg: ScenarioConfig = {
    diskBytes,
    memoryBytes,
    reps: Math.round(positive(f.reps, q ? 1 : 5, 'reps')),
    opsPerSecond: positive(f.ops, q ? 100 : 500, 'ops'),
    workloads: list<Workload>(f.workloads, WORKLOADS, q ? ['idle', 'randwrite'] : WORKLOADS, 'workload'),
    modes: list<MigrationMode>(f.modes, ['tpm', 'precopy'], ['tpm', 'precopy'], 'mode'),
    settleMs: q ? 300 : 1000,
    imFraction: positive(f.imPercent, 5, 'im-percent') / 100,
    bandwidthBytesPerSecond: positive(f.bandwidth, 125e6, 'bandwidth'),
    // readmostly: its writes stay in a 1 MiB hot set, so each VM converges even when 50 share the
    // machine's transfer rate (randwrite at 100 ops/s re-dirties a 32 MiB disk faster than that).
    concurrent: {
      count: Math.round(count),
      diskBytes: (q ? 16 : 32) * MiB,
      memoryBytes: (q ? 4 : 8) * MiB,
      workload: 'readmostly',
      opsPerSecond: 100,
      hostLimit: Math.round(positive(f.hostLimit, 4, 'host-limit')),
      clusterLimit: Math.round(positive(f.clusterLimit, 16, 'cluster-limit')),
    },
    migrationTimeoutMs: q ? 90_000 : 15 * 60_000,
    heavyMaxRounds: q ? 4 : undefined,
  };
  return { cfg, scenarios: list<ScenarioName>(f.only, SCENARIOS, DEFAULT_SCENARIOS, 'scenario') };
}

async function main(f: Flags): Promise<number> {
  const { cfg, scenarios } = config(f);
  const run = startRun();
  const say = run.say;
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-bench-'));
  let server: DevServer | null = null;
  let cluster: LocalCluster | null = null;
  const running = new Running();
  const cleanup = async () => {
    await running.stopAll();
    await cluster?.stop().catch(() => undefined);
    await server?.stop().catch(() => undefined);
    if (!f.keepDir) await fs.rm(root, { recursive: true, force: true }).catch(() => undefined);
  };
  stopOnSignals(say, cleanup);

  const res: Results = { runs: [], baselines: null, tracking: [], im: null, heavy: [], bandwidth: null, concurrent: null, violations: {}, qemu: null };
  const has = (s: ScenarioName) => scenarios.includes(s);
  let qemuError: string | null = null;
  try {
    say(`disk ${cfg.diskBytes / MiB} MiB, memory ${cfg.memoryBytes / MiB} MiB, ${cfg.reps} rep(s), workloads ${cfg.workloads.join(',')} at ${cfg.opsPerSecond} ops/s, modes ${cfg.modes.join(',')}; load average ${os.loadavg()[0].toFixed(1)}; working directory ${root}`);
    if (has('baselines')) {
      say('baselines: cp of the disk image and of a memory-sized file, raw TCP copy of the image');
      res.baselines = await measureBaselines(root, cfg.diskBytes, cfg.memoryBytes, Math.min(cfg.reps, 3));
    }
    if (has('tracking')) {
      say('tracking: guest write throughput with tracking off and on, alternating');
      const pairs = f.quick ? 5 : 11;
      res.tracking.push(await measureTracking(root, 'randwrite', cfg.diskBytes, cfg.memoryBytes, pairs, f.quick ? 20_000 : 100_000));
      res.tracking.push(await measureTracking(root, 'seqwrite', cfg.diskBytes, cfg.memoryBytes, pairs, f.quick ? 500 : 2_000));
    }
    const needCluster = scenarios.some((s) => ['matrix', 'im', 'heavy', 'bandwidth', 'concurrent'].includes(s));
    if (needCluster) {
      let address = f.temporalAddress;
      if (!address) {
        say('starting a Temporal dev server (headless, in memory)');
        const cli = await ensureTemporalCli({ log: (l) => say(`  ${l}`) });
        server = await startDevServer({ cliPath: cli.path, uiPort: null });
        address = server.address;
      }
      say(`starting ${HOSTS.length} host agents on Temporal ${address}`);
      const clusterRoot = path.join(root, 'cluster');
      // Agents (and the VM processes they start) write V8 CPU profiles there when they exit.
      const env: Record<string, string> = {
        FERRY_MAX_MIGRATIONS: String(cfg.concurrent.hostLimit),
        FERRY_CLUSTER_MAX_MIGRATIONS: String(cfg.concurrent.clusterLimit),
      };
      if (f.cpuProf) {
        await fs.mkdir(f.cpuProf, { recursive: true });
        const hook = path.join(__dirname, 'cpu-profile.cjs');
        env.NODE_OPTIONS = `${process.env.NODE_OPTIONS ?? ''} --require ${hook}`.trim();
        env.FERRY_BENCH_CPU_PROF_DIR = path.resolve(f.cpuProf);
      }
      if (!f.fromSources) await buildDist(say);
      cluster = await LocalCluster.start({ temporalAddress: address, hosts: HOSTS, root: clusterRoot, env, compiled: !f.fromSources });
      const bench = new Bench(cluster.ferryClient(), cluster, cfg, say);
      res.runs = bench.runs;
      res.violations = bench.violations;
      if (has('matrix')) await bench.matrix();
      if (has('im')) res.im = await bench.incremental();
      if (has('heavy')) for (const mode of f.quick ? (['tpm'] as const) : cfg.modes) res.heavy.push(await bench.heavyWriter(mode));
      if (has('bandwidth')) res.bandwidth = await bench.bandwidthLimited();
      if (has('concurrent')) res.concurrent = await bench.concurrent();
      const bad = Object.entries(bench.violations).filter(([, v]) => v !== 0);
      for (const [vm, v] of bad) say(`WARNING: guest of ${vm} saw ${v} read-check violations`);
      // The scenarios below share the machine with nothing of this one.
      await cluster.stop();
      cluster = null;
      await server?.stop();
      server = null;
    }
    if (has('qemu')) {
      const explicit = (f.only ?? '').split(',').map((x) => x.trim()).includes('qemu');
      const assets = await findQemuAssets();
      if ('missing' in assets && !explicit) {
        say(`qemu: skipped, QEMU is not provisioned here (${assets.missing}; npm run setup:qemu provisions it)`);
      } else {
        say('qemu: Ferry beside QEMU\'s own mirror + migrate and a plain TCP copy, on a real guest');
        const qcfg = qemuBenchConfig({ quick: f.quick, reps: f.quick ? undefined : String(Math.min(cfg.reps, 3)) });
        const qroot = path.join(root, 'qemu');
        await fs.mkdir(qroot);
        // A scenario that fails is reported with the rest, not instead of it.
        try {
          res.qemu = await runQemuBench(qcfg, { root: qroot, say, fromSources: f.fromSources, running });
        } catch (err) {
          qemuError = (err as Error).message;
          say(`ERROR: qemu: ${qemuError}`);
        }
      }
    }
    let network: NetworkRun[] | null = null;
    if (has('network')) {
      say('network: the data plane between two network namespaces over 1 Gbit/s links at 1 and 20 ms RTT');
      network = await measureNetwork({ mib: f.quick ? 128 : 512, reps: Math.min(cfg.reps, 3), log: say });
    }
    let admission: AdmissionLoadResult | null = null;
    if (has('admission')) {
      say('admission: 1,000 migrations with no data queue for the cluster scope (Temporal server of its own)');
      const cli = await ensureTemporalCli({ log: (l) => say(`  ${l}`) });
      const own = await startDevServer({ cliPath: cli.path, uiPort: null });
      try {
        admission = await runAdmissionLoad({ address: own.address, migrations: f.quick ? 200 : 1000, hosts: 20, clusterLimit: 32, log: say });
      } finally {
        await own.stop();
      }
    }
    const summary = summarize(res);
    process.stdout.write(`${formatReport(res, summary)}\n`);
    if (network) process.stdout.write(`\n${formatNetwork(network)}\n`);
    if (admission) process.stdout.write(`\nadmission load: ${JSON.stringify(admission)}\n`);
    if (f.json) {
      const meta = { ...run.meta(), config: cfg };
      await fs.writeFile(f.json, `${JSON.stringify({ meta, summary, baselines: res.baselines, tracking: res.tracking, im: res.im, bandwidth: res.bandwidth, concurrent: res.concurrent, runs: res.runs, qemu: res.qemu, qemu_error: qemuError, network, admission }, null, 2)}\n`);
      say(`wrote ${f.json}`);
    }
    if (f.charts) for (const file of await writeCharts(f.charts, res, summary, say)) say(`wrote ${file}`);
    say(`done in ${run.elapsedS().toFixed(0)} s${qemuError ? '; the qemu scenario failed' : ''}`);
    return qemuError ? 1 : 0;
  } finally {
    await cleanup();
  }
}

const program = new Command('ferry-bench')
  .description('Benchmark Ferry with real migrations against the limits of this machine, measured in the same run')
  .option('--quick', 'small sizes, 1 repetition, a subset of workloads (under 3 minutes)', false)
  .option('--json <file>', 'write every run and the summary as JSON')
  .option('--charts <dir>', 'write SVG charts (needs vega and vega-lite)')
  .option('--disk-mib <n>', 'VM disk size in MiB (default 1024; 64 with --quick)')
  .option('--memory-mib <n>', 'VM memory size in MiB (default 256; 16 with --quick)')
  .option('--reps <n>', 'repetitions per workload and mode (default 5; 1 with --quick)')
  .option('--ops <n>', 'guest operations per second of the matrix VMs (default 500; 100 with --quick; seqwrite: 1/64 of it, for the same bytes written)')
  .option('--workloads <list>', `comma-separated, from ${WORKLOADS.join(',')}`)
  .option('--modes <list>', 'comma-separated, from tpm,precopy')
  .option('--concurrent <n>', 'VMs migrating at once (default 50; 8 with --quick)')
  .option('--host-limit <n>', 'migrations at once per host (the agents\' --max-migrations)', '4')
  .option('--cluster-limit <n>', 'migrations at once in the cluster (the agents\' --cluster-max-migrations)', '16')
  .option('--bandwidth <bytes/s>', 'data-plane limit of the bandwidth-limited run', '125e6')
  .option('--im-percent <p>', 'share of blocks written between the migrations of the incremental scenario', '5')
  .option('--only <list>', `run only these, comma-separated: ${SCENARIOS.join(',')}`)
  .option('--temporal-address <host:port>', 'use this Temporal server instead of starting a dev server')
  .option('--keep-dir', 'keep the working directory (agent logs, images) for inspection', false)
  .option('--from-sources', 'run the agents through tsx from the sources instead of the compiled dist/ (no build step)', false)
  .option('--cpu-prof <dir>', 'write V8 CPU profiles of the host agents and VM processes into this directory')
  .action(async (f: Flags) => {
    process.exitCode = await main(f);
  });

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`ferry bench failed: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
