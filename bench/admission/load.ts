// The admission load test: many migrations with no data to move (admissionProbe workflows, whose fake
// host queues answer at once) queue for the cluster scope's slots, through the real admission
// semaphore workflow, requestSlot activity and Slots. It measures how many admissions per second the
// cluster scope grants, how long a migration waits with N queued, that the limit is never exceeded and
// that the scope's history stays bounded (continue-as-new).
//   npx tsx bench/admission/load.ts [--migrations 1000] [--hosts 20] [--cluster-limit 32] [--json FILE]
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { Command } from 'commander';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection, Worker } from '@temporalio/worker';
import { requestSlotActivity } from '../../activities/admission';
import { createControlActivities } from '../../activities/control';
import { hostTaskQueue } from '../../common/types';
import { CLUSTER_SCOPE, admissionStateQuery, admissionWorkflowId, type AdmissionState } from '../../workflows/definitions';
import { ensureTemporalCli, startDevServer, type DevServer } from '../../scripts/temporal-cli';
import type { ProbeResult } from './probe-workflow';
import { percentile } from '../stats';

export interface AdmissionLoadOptions {
  /** A Temporal server of its own: the cluster scope's workflow id is global to a namespace. */
  address: string;
  migrations: number;
  hosts: number;
  clusterLimit: number;
  /** Host limits high enough that the cluster scope is the bottleneck. */
  hostLimit?: number;
  holdMs?: number;
  /** Continue-as-new threshold of the scope (default: the workflow's own). */
  historyLimit?: number;
  /** Stop waiting after this long and report what was granted by then (default: wait for all). */
  timeoutMs?: number;
  log?: (line: string) => void;
}

export interface AdmissionLoadResult {
  migrations: number;
  /** Migrations that got their slots and finished before the timeout. */
  finished: number;
  /** Seconds it took to start them all (the client's and the workers' share of the machine). */
  startSeconds: number;
  hosts: number;
  clusterLimit: number;
  durationSeconds: number;
  /** Slots granted (and given back) per second by the cluster scope, first grant to last. */
  grantsPerSecond: number;
  /** How long a migration waited for its slots (workflow time), ms. */
  waitMs: { p50: number; p90: number; p99: number; max: number };
  maxHoldersSeen: number;
  /** Runs of the cluster scope's workflow (continue-as-new makes more than one) and the largest history of one. */
  clusterRuns: number;
  maxRunHistoryEvents: number;
}

export async function runAdmissionLoad(o: AdmissionLoadOptions): Promise<AdmissionLoadResult> {
  const log = o.log ?? (() => undefined);
  const tag = randomBytes(3).toString('hex');
  const hosts = Array.from({ length: o.hosts }, (_, i) => `load-${tag}-h${i}`);
  const limits = { host: o.hostLimit ?? o.migrations, cluster: o.clusterLimit };
  const taskQueue = `load-${tag}`;
  const clusterScopeId = admissionWorkflowId(CLUSTER_SCOPE, taskQueue);
  const native = await NativeConnection.connect({ address: o.address });
  const connection = await Connection.connect({ address: o.address });
  const client = new Client({ connection });
  const workers = [
    await Worker.create({
      connection: native,
      taskQueue,
      workflowsPath: require.resolve('./probe-workflow'),
      activities: createControlActivities(),
      maxCachedWorkflows: o.migrations + 50,
    }),
    ...(await Promise.all(hosts.map((h) => Worker.create({ connection: native, taskQueue: hostTaskQueue(h), activities: { requestSlot: requestSlotActivity(h, limits, taskQueue) } })))),
  ];
  const running = workers.map((w) => w.run());
  try {
    const scope = client.workflow.getHandle(clusterScopeId);
    if (o.historyLimit) {
      const initial: AdmissionState = { scope: CLUSTER_SCOPE, limit: o.clusterLimit, holders: [], waiting: [], historyLimit: o.historyLimit };
      await client.workflow.start('admission', { workflowId: clusterScopeId, taskQueue, args: [initial] });
    }
    let maxHolders = 0;
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const s = await scope.query(admissionStateQuery).catch(() => null);
        if (s) maxHolders = Math.max(maxHolders, s.holders.length);
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
    const started = performance.now();
    log(`starting ${o.migrations} migrations over ${o.hosts} hosts, cluster limit ${o.clusterLimit}`);
    const handles = [];
    for (let i = 0; i < o.migrations; i += 50) {
      handles.push(
        ...(await Promise.all(
          Array.from({ length: Math.min(50, o.migrations - i) }, (_, k) => {
            const n = i + k;
            return client.workflow.start('admissionProbe', {
              workflowId: `load-${tag}-${n}`,
              taskQueue,
              args: [{ source: hosts[n % hosts.length], destination: hosts[(n + 1) % hosts.length], holdMs: o.holdMs ?? 0 }],
            });
          }),
        )),
      );
    }
    const startSeconds = (performance.now() - started) / 1000;
    log(`all started in ${startSeconds.toFixed(1)} s; waiting for them to finish`);
    const results: ProbeResult[] = [];
    const all = Promise.allSettled(handles.map((h) => h.result().then((r: ProbeResult) => void results.push(r))));
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, o.timeoutMs ?? 2 ** 31 - 1)));
    await Promise.race([all, timeout]);
    clearTimeout(timer);
    const durationSeconds = (performance.now() - started) / 1000;
    if (results.length < o.migrations) {
      log(`${o.migrations - results.length} migrations still waiting after ${durationSeconds.toFixed(0)} s: terminating them`);
      await Promise.allSettled(handles.map((h) => h.terminate('admission load test over')));
      await client.workflow.getHandle(clusterScopeId).terminate('admission load test over').catch(() => undefined);
    }
    // Every result call must have ended before the connection closes (a pending retry would hit a closed channel).
    await all.catch(() => undefined);
    sampling = false;
    await sampler;

    const waits = results.map((r) => r.waitedMs).sort((x, y) => x - y);
    const grants = results.map((r) => r.grantedAtMs).sort((x, y) => x - y);
    const span = (grants.at(-1)! - grants[0]) / 1000;
    let clusterRuns = 0;
    let maxRunHistoryEvents = 0;
    for await (const run of client.workflow.list({ query: `WorkflowId = '${clusterScopeId}'` })) {
      clusterRuns++;
      const d = await client.workflow.getHandle(run.workflowId, run.runId).describe();
      maxRunHistoryEvents = Math.max(maxRunHistoryEvents, Number(d.raw.workflowExecutionInfo?.historyLength ?? 0));
    }
    return {
      migrations: o.migrations,
      finished: results.length,
      startSeconds: round(startSeconds),
      hosts: o.hosts,
      clusterLimit: o.clusterLimit,
      durationSeconds: round(durationSeconds),
      grantsPerSecond: round(span > 0 ? (results.length - 1) / span : results.length),
      waitMs: { p50: percentile(waits, 50), p90: percentile(waits, 90), p99: percentile(waits, 99), max: waits.at(-1)! },
      maxHoldersSeen: maxHolders,
      clusterRuns,
      maxRunHistoryEvents,
    };
  } finally {
    for (const w of workers) w.shutdown();
    await Promise.allSettled(running);
    await native.close();
    await connection.close();
  }
}

const round = (x: number) => Math.round(x * 10) / 10;

async function main(): Promise<void> {
  const f = new Command('admission-load')
    .option('--migrations <n>', 'migrations queued at once', '1000')
    .option('--hosts <n>', 'fake hosts', '20')
    .option('--cluster-limit <n>', 'cluster-wide slots', '32')
    .option('--hold-ms <ms>', 'how long each migration holds its slots', '0')
    .option('--timeout-s <s>', 'report what was granted by then', '600')
    .option('--json <file>', 'write the result as JSON')
    .parse()
    .opts<{ migrations: string; hosts: string; clusterLimit: string; holdMs: string; timeoutS: string; json?: string }>();
  const cli = await ensureTemporalCli();
  const server: DevServer = await startDevServer({ cliPath: cli.path, uiPort: null });
  try {
    const result = await runAdmissionLoad({
      address: server.address,
      migrations: Number(f.migrations),
      hosts: Number(f.hosts),
      clusterLimit: Number(f.clusterLimit),
      holdMs: Number(f.holdMs),
      timeoutMs: Number(f.timeoutS) * 1000,
      log: (l) => process.stderr.write(`[admission-load] ${l}\n`),
    });
    console.log(JSON.stringify(result, null, 2));
    if (f.json) await fs.writeFile(path.resolve(f.json), `${JSON.stringify(result, null, 2)}\n`);
  } finally {
    await server.stop();
  }
}

if (require.main === module) {
  main().then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
