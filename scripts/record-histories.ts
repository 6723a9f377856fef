/**
 * `npm run record-histories`: run real migrations through today's workflow code and write their
 * event histories to test/fixtures/histories/, for the replay test (test/integration/replay.test.ts)
 * that checks every later change of the workflow code against them. Everything it needs is started
 * here (a Temporal dev server on SQLite, two agents, VM processes) and stopped at the end.
 *
 * Scenarios: a full and an incremental migration that complete, one aborted (rolled back), one that
 * fails over from a destination without an agent to the next, and real faults from the chaos harness
 * (agent kill -9 during the precopy, Temporal server kill -9 during the switchover, a cut link during
 * the postcopy); plus the admission semaphore's and a host command's histories.
 *
 *   npm run record-histories [-- --out DIR]
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Command } from 'commander';
import type { Client } from '@temporalio/client';
import { startChaosEnv, stopChaosEnv, type ChaosEnv } from '../chaos/env';
import { runCell } from '../chaos/cell';
import type { FaultName } from '../chaos/faults';
import type { PointName } from '../chaos/points';
import type { MigrationHandle } from '../client/ferry-client';
import type { MigrateVmInput } from '../common/migration';
import { temporal } from '@temporalio/proto';

export const HISTORIES_DIR = path.resolve(__dirname, '..', 'test', 'fixtures', 'histories');

const MiB = 1024 * 1024;
const say = (line: string) => process.stderr.write(`[record-histories] ${line}\n`);

interface Recorded {
  file: string;
  /** The replay must use it: commands (child workflow ids...) are derived from it. */
  workflowId: string;
  workflowType: string;
  events: number;
}

async function main(out: string): Promise<void> {
  await fs.mkdir(out, { recursive: true });
  const env = await startChaosEnv();
  const recorded: Recorded[] = [];
  const tag = Date.now().toString(36);
  try {
    const [a, b] = env.hosts;
    const save = async (name: string, workflowId: string, runId?: string) => {
      recorded.push(await writeHistory(env.cluster.client, out, name, workflowId, runId));
      say(`${name}: ${recorded.at(-1)!.events} events`);
    };
    const vm = (suffix: string) => ({ vmId: `rec-${tag}-${suffix}`, diskBytes: 16 * MiB, memoryBytes: 8 * MiB, workload: 'mixed' as const, seed: 5, opsPerSecond: 300, fill: true });

    // First: the chaos cells check that no VM process but theirs runs on the hosts.
    const cells: [FaultName, PointName, string][] = [
      ['kill-source', 'disk-precopy', 'fault-kill-source-disk-precopy'],
      ['restart-temporal', 'before-pause', 'fault-restart-temporal-switchover'],
      ['cut-link', 'postcopy', 'fault-cut-link-postcopy'],
    ];
    for (const [fault, point, name] of cells) {
      say(`with faults: ${fault} at ${point}`);
      const cell = await runCell(env, fault, point, 1, { tag, destinationDeadlineSeconds: 5 });
      if (!cell.ok) throw new Error(`${fault} at ${point}: ${cell.outcome}: ${cell.problems.join('; ')}`);
      await save(name, `migrate-chaos-${tag}-${fault}-${point}-1`);
    }

    say('completed: a full migration there and an incremental one back');
    const v1 = vm('completed');
    await env.ferry.hostCommand(a, 'vmCreate', v1);
    const there = await migrateToEnd(env, { vmId: v1.vmId, sourceHost: a, destinationHosts: [b] }, 'completed');
    await save('completed-full', there.workflowId);
    const back = await migrateToEnd(env, { vmId: v1.vmId, sourceHost: b, destinationHosts: [a] }, 'completed');
    await save('completed-incremental', back.workflowId);

    say('rolled back: aborted during the disk precopy');
    const v2 = vm('aborted');
    await env.ferry.hostCommand(a, 'vmCreate', v2);
    const aborted = await env.ferry.migrate({ vmId: v2.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 2 * MiB });
    await waitPhase(aborted, 'disk-precopy');
    await aborted.abort('recorded abort');
    await expectOutcome(aborted, 'rolled-back');
    await save('rolled-back-abort', aborted.workflowId);

    say('failed over: the first destination has no agent, the next one takes the VM');
    const v3 = vm('failover');
    await env.ferry.hostCommand(a, 'vmCreate', v3);
    const failover = await env.ferry.migrate(
      { vmId: v3.vmId, sourceHost: a, destinationHosts: [`gone-${tag}`, b], destinationDeadlineSeconds: 10 },
      { checkHosts: false },
    );
    const report = await expectOutcome(failover, 'completed');
    if (report.failedDestinations.length !== 1) throw new Error(`failover: expected one failed destination, got ${JSON.stringify(report.failedDestinations)}`);
    await save('failed-over', failover.workflowId);

    say('admission and host commands');
    await saveLatestClosed(env.cluster.client, `WorkflowType = 'admission'`, (id, run) => save('admission-cluster', id, run));
    await saveLatestClosed(env.cluster.client, `WorkflowType = 'hostCommand'`, (id, run) => save('host-command', id, run));

    await fs.writeFile(path.join(out, 'index.json'), `${JSON.stringify({ recordedAt: new Date().toISOString(), histories: recorded }, null, 2)}\n`);
    say(`${recorded.length} histories written to ${out}`);
  } finally {
    await stopChaosEnv(env);
  }
}

async function migrateToEnd(env: ChaosEnv, input: MigrateVmInput, outcome: 'completed' | 'rolled-back'): Promise<MigrationHandle> {
  const handle = await env.ferry.migrate(input);
  await expectOutcome(handle, outcome);
  return handle;
}

async function expectOutcome(handle: MigrationHandle, outcome: 'completed' | 'rolled-back') {
  const report = await handle.result();
  if (report.outcome !== outcome) throw new Error(`${handle.workflowId}: expected ${outcome}, got ${report.outcome} (${report.reason ?? ''})`);
  return report;
}

async function waitPhase(handle: MigrationHandle, phase: string): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if ((await handle.progress()).phase === phase) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${handle.workflowId} never reached ${phase}`);
}

async function saveLatestClosed(client: Client, query: string, save: (workflowId: string, runId: string) => Promise<void>): Promise<void> {
  for await (const w of client.workflow.list({ query: `${query} AND ExecutionStatus != 'Running'` })) {
    await save(w.workflowId, w.runId);
    return;
  }
  throw new Error(`no closed workflow matches ${query}`);
}

async function writeHistory(client: Client, out: string, name: string, workflowId: string, runId?: string): Promise<Recorded> {
  const handle = client.workflow.getHandle(workflowId, runId);
  const description = await handle.describe();
  const history = await handle.fetchHistory();
  const file = `${name}.json`;
  await fs.writeFile(path.join(out, file), historyToText(history));
  return { file, workflowId, workflowType: description.type, events: history.events?.length ?? 0 };
}

type History = temporal.api.history.v1.IHistory;
const HistoryType = temporal.api.history.v1.History;

/**
 * A history as JSON text: the protobuf object form with enums as names, 64-bit numbers as strings and
 * payload bytes in base64, so a diff of two recordings reads as events.
 */
export function historyToText(history: History): string {
  const object = HistoryType.toObject(HistoryType.fromObject(history), { enums: String, longs: String, bytes: String });
  return `${JSON.stringify(object, null, 1)}\n`;
}

export function historyFromText(text: string): History {
  return HistoryType.fromObject(JSON.parse(text) as Record<string, unknown>);
}

if (require.main === module) {
  const opts = new Command('record-histories').option('--out <dir>', 'where to write the histories', HISTORIES_DIR).parse().opts<{ out: string }>();
  main(path.resolve(opts.out)).then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(`record-histories failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
      process.exit(1);
    },
  );
}
