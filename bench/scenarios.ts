// The migration scenarios of the benchmark, each made of real migrations between the agents of a
// LocalCluster: the workload × mode matrix (full, then incremental back), a controlled incremental
// migration, a heavy writer, a bandwidth-limited run and many concurrent migrations.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { FerryClient, MigrationHandle } from '../client/ferry-client';
import type { LocalCluster } from '../harness/cluster';
import type { MigrateVmInput, MigrationMode, MigrationReport } from '../common/migration';
import type { Workload } from '../common/types';
import { historyBreakdown, type HistoryBreakdown } from './history';
import { formatGuestRounds, guestRounds, sampleGuest, type GuestRound } from './guest-rate';
import { setTimeout as sleep } from 'node:timers/promises';

export const BLOCK_BYTES = 64 * 1024;

export interface ScenarioConfig {
  diskBytes: number;
  memoryBytes: number;
  reps: number;
  /** Guest operations per second of the matrix VMs (seqwrite gets 1/64 of it: same bytes written). */
  opsPerSecond: number;
  workloads: Workload[];
  modes: MigrationMode[];
  /** Guest run time between a migration and the next one of the same VM (ms). */
  settleMs: number;
  imFraction: number;
  bandwidthBytesPerSecond: number;
  concurrent: { count: number; diskBytes: number; memoryBytes: number; workload: Workload; opsPerSecond: number; hostLimit: number; clusterLimit: number };
  /** Give up waiting for one migration after this long (ms). */
  migrationTimeoutMs: number;
  /** Cap on the heavy writer's disk rounds (undefined: the workflow's default), to bound --quick. */
  heavyMaxRounds?: number;
}

export type Scenario = 'matrix' | 'im' | 'heavy-writer' | 'bandwidth' | 'concurrent';

export interface RunRecord {
  scenario: Scenario;
  workload: Workload;
  mode: MigrationMode;
  kind: 'full' | 'incremental';
  rep: number;
  vm_id: string;
  from: string;
  to: string;
  ops_per_second: number;
  outcome: MigrationReport['outcome'] | 'failed';
  error: string | null;
  incremental: boolean;
  incremental_fallback: string | null;
  downtime_ms: number | null;
  total_ms: number;
  disk_bytes: number;
  memory_bytes: number;
  disk_rounds: number;
  memory_rounds: number;
  postcopy_ms: number;
  on_demand_fetches: number;
  skipped_blocks: number;
  throttled: boolean;
  /** Time the agents measured moving bytes (sum over the transfer activities); null without history. */
  transfer_ms: number | null;
  /** total_ms - transfer_ms: validation, preparation, Temporal round trips, finalization. */
  overhead_ms: number | null;
  queue_ms: number | null;
  dirty_blocks_per_round: number[];
  stale_blocks_at_freeze: number | null;
  /** The source's own measure of the freeze (pause to the destination's answer to the final handoff). */
  freeze_ms: number | null;
  activities: HistoryBreakdown['activities'] | null;
  steps: HistoryBreakdown['steps'];
  /** Heavy writer: each disk round with the guest's rate during it and the throttle in force. */
  guest_rounds: GuestRound[];
}

export interface ImResult {
  disk_bytes: number;
  memory_bytes: number;
  blocks: number;
  /** 64 KiB blocks that differ between the base and the VM's disk before the migration back. */
  blocks_written: number;
  /** What an ideal incremental migration sends: the blocks written since, plus all of memory. */
  expected_bytes: number;
  bytes: number;
  full_total_ms: number;
  im_total_ms: number;
  time_ratio: number;
}

export interface ConcurrentResult {
  count: number;
  failures: number;
  host_limit: number;
  cluster_limit: number;
  /** Most slots seen in use at once (sampled): per host, and cluster-wide. */
  peak_host_slots: number;
  peak_cluster_slots: number;
  wall_ms: number;
  bytes: number;
  aggregate_mb_s: number;
  errors: string[];
}

export interface BandwidthResult {
  bytes_per_second: number;
  /** (disk + memory size) / bandwidth. */
  theoretical_s: number;
  /** bytes actually sent / bandwidth (includes dirty rounds). */
  sent_theoretical_s: number;
  total_s: number;
  total_over_theoretical: number;
}

type Say = (line: string) => void;

/** The migration's report, or an error (and an abort of the migration) after `timeoutMs`. */
export async function resultWithin(handle: MigrationHandle, timeoutMs: number): Promise<MigrationReport> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no result after ${timeoutMs / 1000} s`)), timeoutMs);
  });
  try {
    return await Promise.race([handle.result(), timeout]);
  } catch (err) {
    await handle.abort('benchmark timeout').catch(() => undefined);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

export class Bench {
  readonly runs: RunRecord[] = [];
  /** Guest read-check violations seen at cleanup, per VM (must all be 0). */
  readonly violations: Record<string, number> = {};
  private counter = 0;

  constructor(
    private readonly ferry: FerryClient,
    private readonly cluster: LocalCluster,
    private readonly cfg: ScenarioConfig,
    private readonly say: Say,
  ) {}

  private vmName(tag: string): string {
    return `bench-${tag}-${process.pid}-${++this.counter}`;
  }

  private async createVm(host: string, vmId: string, workload: Workload, opsPerSecond: number, diskBytes = this.cfg.diskBytes, memoryBytes = this.cfg.memoryBytes): Promise<void> {
    await this.ferry.hostCommand(host, 'vmCreate', { vmId, diskBytes, memoryBytes, workload, seed: 7, opsPerSecond, fill: true });
  }

  /** Destroys the VM and its bases wherever they are; errors (nothing there) are expected and ignored. */
  private async cleanup(vmId: string, hosts: string[]): Promise<void> {
    for (const host of hosts) {
      const s = await this.ferry.hostCommand(host, 'vmInspect', { vmId }).catch(() => null);
      if (s && s.ownership?.state === 'running') this.violations[vmId] = s.guest?.violations ?? 0;
    }
    for (const host of hosts) await this.ferry.hostCommand(host, 'vmDestroy', { vmId }).catch(() => undefined);
    for (const host of hosts) await this.ferry.hostCommand(host, 'baseDelete', { vmId }).catch(() => undefined);
  }

  private result(handle: MigrationHandle): Promise<MigrationReport> {
    return resultWithin(handle, this.cfg.migrationTimeoutMs);
  }

  /** One migration, recorded, with the time breakdown read from its workflow history. */
  async migrate(label: Pick<RunRecord, 'scenario' | 'workload' | 'kind' | 'rep' | 'ops_per_second'>, input: MigrateVmInput): Promise<RunRecord> {
    const mode = input.mode ?? 'tpm';
    const rec: RunRecord = {
      ...label,
      mode,
      vm_id: input.vmId,
      from: input.sourceHost,
      to: input.destinationHosts[0],
      outcome: 'failed',
      error: null,
      incremental: false,
      incremental_fallback: null,
      downtime_ms: null,
      total_ms: NaN,
      disk_bytes: 0,
      memory_bytes: 0,
      disk_rounds: 0,
      memory_rounds: 0,
      postcopy_ms: 0,
      on_demand_fetches: 0,
      skipped_blocks: 0,
      throttled: false,
      transfer_ms: null,
      overhead_ms: null,
      queue_ms: null,
      dirty_blocks_per_round: [],
      stale_blocks_at_freeze: null,
      freeze_ms: null,
      activities: null,
      steps: [],
      guest_rounds: [],
    };
    try {
      const handle = await this.ferry.migrate(input);
      const r = await this.result(handle);
      Object.assign(rec, {
        outcome: r.outcome,
        error: r.outcome === 'completed' ? null : (r.reason ?? null),
        incremental: r.incremental,
        incremental_fallback: r.incrementalFallbackReason ?? null,
        downtime_ms: r.downtimeMs,
        total_ms: r.totalMs,
        disk_bytes: r.diskBytesSent,
        memory_bytes: r.memoryBytesSent,
        disk_rounds: r.diskRounds,
        memory_rounds: r.memoryRounds,
        postcopy_ms: r.postcopyMs,
        on_demand_fetches: r.onDemandFetches,
        skipped_blocks: r.skippedBlocks,
        throttled: r.throttled,
      });
      // Right after the result: the handle names the workflow id, and its latest run is this one.
      const h = await historyBreakdown(handle.workflow);
      Object.assign(rec, {
        transfer_ms: h.transferMs,
        overhead_ms: Math.max(0, r.totalMs - h.transferMs),
        queue_ms: h.queueMs,
        dirty_blocks_per_round: h.dirtyBlocksPerRound,
        stale_blocks_at_freeze: h.staleBlocksAtFreeze,
        freeze_ms: h.freezeMs,
        activities: h.activities,
        steps: h.steps,
      });
    } catch (err) {
      rec.error = (err as Error).message;
    }
    this.runs.push(rec);
    return rec;
  }

  private describe(r: RunRecord): string {
    if (r.outcome !== 'completed') return `${r.outcome}: ${r.error ?? ''}`;
    const mb = (r.disk_bytes + r.memory_bytes) / 1e6;
    return `total ${(r.total_ms / 1000).toFixed(2)} s, downtime ${r.downtime_ms ?? '-'} ms, sent ${mb.toFixed(1)} MB${r.incremental ? ' (incremental)' : ''}${r.throttled ? ', throttled' : ''}`;
  }

  /** Each workload × mode: a full migration h1→h2, then the incremental one back, `reps` times. */
  async matrix(): Promise<void> {
    for (const workload of this.cfg.workloads) {
      const ops = workload === 'seqwrite' ? Math.max(1, Math.round(this.cfg.opsPerSecond / 64)) : this.cfg.opsPerSecond;
      const vmId = this.vmName(workload);
      this.say(`matrix: creating ${vmId} (${workload} at ${ops} ops/s)`);
      await this.createVm('h1', vmId, workload, ops);
      let at = 'h1';
      const other = () => (at === 'h1' ? 'h2' : 'h1');
      try {
        for (const mode of this.cfg.modes) {
          for (let rep = 1; rep <= this.cfg.reps; rep++) {
            for (const kind of ['full', 'incremental'] as const) {
              await sleep(this.cfg.settleMs);
              const r = await this.migrate(
                { scenario: 'matrix', workload, kind, rep, ops_per_second: ops },
                { vmId, sourceHost: at, destinationHosts: [other()], mode, incremental: kind === 'full' ? 'off' : 'auto' },
              );
              this.say(`  ${workload} ${mode} ${kind} #${rep} ${r.from}→${r.to}: ${this.describe(r)}`);
              if (r.outcome === 'completed') at = r.to;
            }
          }
        }
      } finally {
        await this.cleanup(vmId, ['h1', 'h2']);
      }
    }
  }

  /**
   * Incremental migration with a known write set. The guest runs slowly during the first migration,
   * is halted on the destination right after it, then runs there until randwrite has dirtied about
   * `imFraction` of the 64 KiB blocks, and stays halted during the migration back: the bytes an ideal
   * incremental migration sends are then exactly known (those blocks, plus all of memory).
   */
  async incremental(): Promise<ImResult | null> {
    const vmId = this.vmName('im');
    const { diskBytes, memoryBytes, imFraction } = this.cfg;
    const blocks = Math.ceil(diskBytes / BLOCK_BYTES);
    // Slow enough that the few seconds between the commit and the halt write well under imFraction.
    const rate = Math.max(10, Math.round((blocks * imFraction) / 20));
    this.say(`im: ${vmId} (randwrite at ${rate} ops/s), about ${(imFraction * 100).toFixed(1)}% of ${blocks} blocks written between the migrations`);
    await this.createVm('h1', vmId, 'randwrite', rate);
    try {
      await sleep(this.cfg.settleMs);
      const label = { scenario: 'im' as const, workload: 'randwrite' as const, rep: 1, ops_per_second: rate };
      const full = await this.migrate({ ...label, kind: 'full' }, { vmId, sourceHost: 'h1', destinationHosts: ['h2'], incremental: 'off' });
      this.say(`  full h1→h2 (guest running): ${this.describe(full)}`);
      if (full.outcome !== 'completed') return null;
      await this.halt('h2', vmId);
      const base = this.diskImage('h1', vmId);
      const disk = this.diskImage('h2', vmId);
      let written = await differingBlocks(base, disk, BLOCK_BYTES);
      const wanted = Math.round(imFraction * blocks);
      if (written < wanted) {
        await this.ferry.hostCommand('h2', 'vmResume', { vmId });
        while (written < wanted) {
          await sleep(100);
          written = await differingBlocks(base, disk, BLOCK_BYTES);
        }
        await this.ferry.hostCommand('h2', 'vmPause', { vmId });
        written = await differingBlocks(base, disk, BLOCK_BYTES);
      }
      this.say(`  guest paused on h2 with ${written} blocks (${((written / blocks) * 100).toFixed(1)}%) different from the base on h1`);
      const back = await this.migrate({ ...label, kind: 'incremental' }, { vmId, sourceHost: 'h2', destinationHosts: ['h1'], incremental: 'auto' });
      this.say(`  incremental h2→h1 (guest halted, so its downtime is not meaningful): ${this.describe(back)}`);
      if (back.outcome !== 'completed') return null;
      const bytes = back.disk_bytes + back.memory_bytes;
      return {
        disk_bytes: back.disk_bytes,
        memory_bytes: back.memory_bytes,
        blocks,
        blocks_written: written,
        expected_bytes: written * BLOCK_BYTES + memoryBytes,
        bytes,
        full_total_ms: full.total_ms,
        im_total_ms: back.total_ms,
        time_ratio: back.total_ms / full.total_ms,
      };
    } finally {
      await this.cleanup(vmId, ['h1', 'h2']);
    }
  }

  /** Stops a running guest where it is. */
  private async halt(host: string, vmId: string): Promise<void> {
    await this.ferry.hostCommand(host, 'vmPause', { vmId });
  }

  private diskImage(host: string, vmId: string): string {
    return path.join(this.cluster.home(host), 'vms', vmId, 'disk.img');
  }

  /** randwrite as fast as the guest can go: a dirty rate at or above the transfer rate. */
  async heavyWriter(mode: MigrationMode): Promise<RunRecord> {
    const vmId = this.vmName('heavy');
    this.say(`heavy writer: ${vmId} (randwrite, unlimited ops/s), ${mode}`);
    await this.createVm('h1', vmId, 'randwrite', 0);
    try {
      await sleep(this.cfg.settleMs);
      const sampler = sampleGuest(this.cluster.home('h1'), vmId);
      const r = await this.migrate(
        { scenario: 'heavy-writer', workload: 'randwrite', kind: 'full', rep: 1, ops_per_second: 0 },
        { vmId, sourceHost: 'h1', destinationHosts: ['h2'], mode, incremental: 'off', convergence: this.cfg.heavyMaxRounds ? { maxRounds: this.cfg.heavyMaxRounds } : undefined },
      );
      r.guest_rounds = guestRounds(await sampler.stop(), r.steps);
      this.say(`  ${this.describe(r)}; disk rounds ${formatGuestRounds(r.guest_rounds)}`);
      return r;
    } finally {
      await this.cleanup(vmId, ['h1', 'h2']);
    }
  }

  async bandwidthLimited(): Promise<BandwidthResult> {
    const vmId = this.vmName('bw');
    const bw = this.cfg.bandwidthBytesPerSecond;
    this.say(`bandwidth: ${vmId} (idle) at ${((bw * 8) / 1e9).toFixed(2)} Gbit/s`);
    await this.createVm('h1', vmId, 'idle', this.cfg.opsPerSecond);
    try {
      await sleep(this.cfg.settleMs);
      const r = await this.migrate(
        { scenario: 'bandwidth', workload: 'idle', kind: 'full', rep: 1, ops_per_second: this.cfg.opsPerSecond },
        { vmId, sourceHost: 'h1', destinationHosts: ['h2'], incremental: 'off', bandwidthBytesPerSecond: bw },
      );
      this.say(`  ${this.describe(r)}`);
      const theoretical = (this.cfg.diskBytes + this.cfg.memoryBytes) / bw;
      return {
        bytes_per_second: bw,
        theoretical_s: theoretical,
        sent_theoretical_s: (r.disk_bytes + r.memory_bytes) / bw,
        total_s: r.total_ms / 1000,
        total_over_theoretical: r.total_ms / 1000 / theoretical,
      };
    } finally {
      await this.cleanup(vmId, ['h1', 'h2']);
    }
  }

  /** `count` small VMs spread over the four hosts, each migrating to the next host, all at once. */
  async concurrent(): Promise<ConcurrentResult> {
    const c = this.cfg.concurrent;
    const hosts = ['h1', 'h2', 'h3', 'h4'];
    const vms = Array.from({ length: c.count }, (_, i) => ({ vmId: this.vmName('conc'), from: hosts[i % 4], to: hosts[(i + 1) % 4] }));
    this.say(`concurrent: creating ${c.count} VMs (${c.diskBytes >> 20} MiB disk, ${c.memoryBytes >> 20} MiB memory, ${c.workload} at ${c.opsPerSecond} ops/s)`);
    try {
      await pool(vms, 4, (v) => this.createVm(v.from, v.vmId, c.workload, c.opsPerSecond, c.diskBytes, c.memoryBytes));
      this.say(`  migrating all ${c.count} at once`);
      const t0 = performance.now();
      const peaks = { host: 0, cluster: 0 };
      let sampling = true;
      const sampler = (async () => {
        while (sampling) {
          const [cluster, ...perHost] = await Promise.all([null, ...hosts].map((h) => this.ferry.slots(h).catch(() => null)));
          peaks.cluster = Math.max(peaks.cluster, cluster?.holders.length ?? 0);
          for (const s of perHost) peaks.host = Math.max(peaks.host, s?.holders.length ?? 0);
          await new Promise((r) => setTimeout(r, 250));
        }
      })();
      const recs = await Promise.all(
        vms.map((v) =>
          this.migrate(
            { scenario: 'concurrent', workload: c.workload, kind: 'full', rep: 1, ops_per_second: c.opsPerSecond },
            { vmId: v.vmId, sourceHost: v.from, destinationHosts: [v.to], incremental: 'off' },
          ),
        ),
      ).finally(() => (sampling = false));
      await sampler;
      const wall = performance.now() - t0;
      const bytes = recs.reduce((s, r) => s + r.disk_bytes + r.memory_bytes, 0);
      const failed = recs.filter((r) => r.outcome !== 'completed');
      const res: ConcurrentResult = {
        count: c.count,
        failures: failed.length,
        host_limit: c.hostLimit,
        cluster_limit: c.clusterLimit,
        peak_host_slots: peaks.host,
        peak_cluster_slots: peaks.cluster,
        wall_ms: wall,
        bytes,
        aggregate_mb_s: bytes / 1e6 / (wall / 1000),
        errors: failed.map((r) => `${r.vm_id}: ${r.error ?? r.outcome}`),
      };
      this.say(
        `  ${c.count - res.failures}/${c.count} completed in ${(wall / 1000).toFixed(1)} s, ${res.aggregate_mb_s.toFixed(0)} MB/s aggregate;` +
          ` slots in use at most ${peaks.host}/${c.hostLimit} per host, ${peaks.cluster}/${c.clusterLimit} cluster-wide`,
      );
      return res;
    } finally {
      await pool(vms, 4, (v) => this.cleanup(v.vmId, [v.from, v.to]));
    }
  }
}

async function pool<T>(items: T[], limit: number, fn: (item: T) => Promise<unknown>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

/** Counts the blocks whose contents differ between two images of the same size. */
export async function differingBlocks(fileA: string, fileB: string, blockBytes: number): Promise<number> {
  const [a, b] = await Promise.all([fs.open(fileA, 'r'), fs.open(fileB, 'r')]);
  try {
    const size = (await a.stat()).size;
    const chunk = blockBytes * 256;
    const bufA = Buffer.alloc(chunk);
    const bufB = Buffer.alloc(chunk);
    let n = 0;
    for (let off = 0; off < size; off += chunk) {
      const len = Math.min(chunk, size - off);
      await Promise.all([a.read(bufA, 0, len, off), b.read(bufB, 0, len, off)]);
      for (let o = 0; o < len; o += blockBytes) {
        const end = Math.min(o + blockBytes, len);
        if (bufA.compare(bufB, o, end, o, end) !== 0) n++;
      }
    }
    return n;
  } finally {
    await a.close();
    await b.close();
  }
}
