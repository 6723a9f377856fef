// npm run chaos: the fault-injection matrix (or the soak) on a Temporal server and cluster of its own.
import { promises as fs } from 'node:fs';
import { Command, InvalidArgumentError } from 'commander';
import { ALL_FAULTS, FAULTS, type FaultName } from './faults';
import { POINTS, type PointName } from './points';
import { startChaosEnv, stopChaosEnv, type NetMode } from './env';
import { runMatrix } from './matrix';
import type { CellResult } from './cell';
import { formatDetails, formatTable } from './table';
import { runSoak } from './soak';
import { DRIVER_KINDS, type DriverKind } from '../hypervisor';
import { ensureQemuAssets } from '../scripts/qemu-assets';

function listOf<T extends string>(all: readonly T[], what: string) {
  return (value: string): T[] => {
    const items = value.split(',').map((s) => s.trim());
    for (const i of items) if (!all.includes(i as T)) throw new InvalidArgumentError(`unknown ${what} ${i}: use ${all.join(', ')}`);
    return items as T[];
  };
}

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(`${value} is not a positive integer`);
  return n;
}

const program = new Command('chaos')
  .description('Inject every fault of the failure table at every migration point into real agents, VMs and a Temporal server, and check every byte')
  .option('--faults <list>', `comma-separated faults (${ALL_FAULTS.join(', ')}; the last three need --net netns)`, listOf(ALL_FAULTS, 'fault'))
  .option('--points <list>', `comma-separated points (${POINTS.join(', ')})`, listOf(POINTS, 'point'))
  .option('--seeds <n>', 'seeds per cell', positiveInt, 3)
  .option('--quick', 'one seed per cell')
  .option('--json <file>', 'write every cell (or the soak summary) as JSON')
  .option('--soak [n]', 'instead of the matrix: N back-and-forth migrations of one VM under randwrite (default 100)')
  .option('--keep', 'keep the run directory (agent logs) afterwards')
  .option('--net <mode>', 'loopback: hosts on this machine\'s loopback, links cut by a TCP proxy; netns: each host and Temporal in a network namespace of its own (root)', (v: string) => {
    if (v !== 'loopback' && v !== 'netns') throw new InvalidArgumentError('use loopback or netns');
    return v as NetMode;
  }, 'loopback')
  .option('--hypervisor <kind>', `the agents' hypervisor (${DRIVER_KINDS.join(', ')}); qemu is provisioned first (npm run setup:qemu)`, (v: string) => {
    if (!(DRIVER_KINDS as readonly string[]).includes(v)) throw new InvalidArgumentError(`use ${DRIVER_KINDS.join(' or ')}`);
    return v as DriverKind;
  }, 'sim')
  .parse();

const opts = program.opts<{ faults?: FaultName[]; points?: PointName[]; seeds: number; quick?: boolean; json?: string; soak?: string | true; keep?: boolean; net: NetMode; hypervisor: DriverKind }>();

async function main(): Promise<number> {
  if (opts.hypervisor === 'qemu') {
    const assets = await ensureQemuAssets({ log: (l) => console.log(`setup:qemu ${l}`) });
    if ('missing' in assets) throw new Error(`--hypervisor qemu: ${assets.missing}`);
  }
  const env = await startChaosEnv({ net: opts.net, hypervisor: opts.hypervisor });
  let stopping = false;
  let leftovers: string[] = [];
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    leftovers = await stopChaosEnv(env, { keepFiles: opts.keep });
    for (const l of leftovers) console.error(`LEFTOVER ${l}`);
  };
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => void stop().finally(() => process.exit(130)));
  try {
    console.log(`chaos run in ${env.root} (Temporal ${env.temporal.address}, SQLite; network ${opts.net}; hypervisor ${env.hypervisor})`);
    if (opts.soak !== undefined) {
      const n = opts.soak === true ? 100 : positiveInt(opts.soak);
      const summary = await runSoak(env, n, (line) => console.log(line));
      console.log(JSON.stringify(summary, null, 2));
      if (opts.json) await fs.writeFile(opts.json, JSON.stringify(summary, null, 2));
      return summary.violations === 0 && summary.failures === 0 && summary.hashesEqual ? 0 : 1;
    }
    const done: CellResult[] = [];
    const cells = await runMatrix(env, {
      faults: opts.faults ?? (opts.net === 'netns' ? ALL_FAULTS : FAULTS),
      points: opts.points,
      seeds: opts.quick ? 1 : opts.seeds,
      tag: Date.now().toString(36),
      onCell: async (c) => {
        console.log(`${c.ok ? 'ok  ' : 'FAIL'} ${c.fault} @ ${c.point} seed ${c.seed}: ${c.outcome} in ${(c.durationMs / 1000).toFixed(1)} s${c.problems.length ? ` — ${c.problems.join('; ')}` : ''}`);
        done.push(c);
        // Written after every cell, so a long run stopped early keeps what it measured.
        if (opts.json) await fs.writeFile(opts.json, JSON.stringify(done, null, 2));
      },
    });
    console.log(`\n${formatTable(cells)}\n`);
    const details = formatDetails(cells);
    if (details) console.log(`${details}\n`);
    console.log(`${cells.filter((c) => c.ok).length}/${cells.length} cells passed`);
    await stop();
    return cells.every((c) => c.ok) && leftovers.length === 0 ? 0 : 1;
  } finally {
    await stop();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
