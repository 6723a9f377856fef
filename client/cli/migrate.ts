// `ferry migrate`, `ferry status` and `ferry list`: start, watch and find migrations.
import { Command, InvalidArgumentError, Option } from 'commander';
import { Connection } from '@temporalio/client';
import { MIGRATION_PHASES, formatRetry, type MigrateVmInput, type MigrationPhase, type MigrationProgress, type MigrationReport } from '../../common/migration';
import type { FerryClient, MigrationHandle, MigrationState } from '../ferry-client';
import { FerryRequestError, isTemporalUnavailable } from '../errors';
import { setTimeout as sleep } from 'node:timers/promises';
import { followMigration, formatBytes, formatRate, formatReport, incrementalLine } from './progress-view';
import { EXIT, ferryAction, hostArg, printJson, table, vmIdArg, withConnectionFlags } from './common';
import { parseRate, parseSize } from './units';

interface MigrateFlags {
  to: string[];
  from?: string;
  mode?: 'tpm' | 'precopy';
  incremental?: 'auto' | 'off' | 'require';
  bandwidth?: number | null;
  blockSize?: number;
  cutover?: 'auto' | 'manual';
  hostCheck: boolean;
  wait?: boolean;
  json?: boolean;
}

function hostList(text: string): string[] {
  const hosts = text.split(',').map((h) => h.trim());
  if (hosts.every((h) => h === '')) throw new InvalidArgumentError('name at least one destination host');
  if (hosts.includes('')) throw new InvalidArgumentError(`${JSON.stringify(text)} has an empty host name: separate the hosts with single commas, e.g. beta,gamma`);
  return hosts.map(hostArg);
}

function outcomeExit(report: MigrationReport): number {
  return report.outcome === 'completed' ? EXIT.ok : EXIT.rolledBack;
}

/** Ctrl-C while waiting stops watching, not the migration: it goes on in Temporal. */
class Detached extends Error {}

function onInterrupt(): { signal: AbortSignal; dispose(): void } {
  const ac = new AbortController();
  const handler = () => ac.abort(new Detached('interrupted'));
  process.once('SIGINT', handler);
  return { signal: ac.signal, dispose: () => process.off('SIGINT', handler) };
}

/**
 * Wait for the end of a migration, with a progress bar on stderr unless `quiet`. Resolves with the
 * report, or null when Ctrl-C stopped the watching (the migration goes on); rejects with the failure.
 * While the Temporal server does not answer it says so and keeps trying.
 */
async function waitForEnd(handle: MigrationHandle, quiet: boolean | undefined): Promise<MigrationReport | null> {
  const interrupt = onInterrupt();
  const server = watchServer(handle, interrupt.signal);
  try {
    const aborted = new Promise<never>((_, reject) => interrupt.signal.addEventListener('abort', () => reject(interrupt.signal.reason as Error), { once: true }));
    for (;;) {
      try {
        return quiet ? await Promise.race([handle.result(), aborted]) : await followMigration(handle, { signal: interrupt.signal });
      } catch (err) {
        if (!isTemporalUnavailable(err)) throw err;
        await Promise.race([server.answering(), aborted]);
      }
    }
  } catch (err) {
    if (!(err instanceof Detached)) throw err;
    process.stderr.write(`\nferry: stopped watching; the migration of ${handle.vmId} goes on (ferry status ${handle.vmId} --follow, ferry abort ${handle.vmId})\n`);
    return null;
  } finally {
    server.stop();
    interrupt.dispose();
  }
}

const SERVER_CHECK_MS = 2000;
const SERVER_DEADLINE_MS = 5000;

/** Asks the Temporal server about the workflow every few seconds, and says when it stops and starts answering. */
function watchServer(handle: MigrationHandle, signal: AbortSignal): { answering(): Promise<void>; stop(): void } {
  const { connection } = handle.workflow.client;
  const who = connection instanceof Connection ? `the Temporal server at ${connection.options.address}` : 'the Temporal server';
  let lost = false;
  let back: (() => void)[] = [];
  let stopped = false;
  void (async () => {
    while (!stopped && !signal.aborted) {
      try {
        await connection.withDeadline(Date.now() + SERVER_DEADLINE_MS, () => handle.workflow.describe());
        if (lost) process.stderr.write(`\nferry: ${who} answers again; following ${handle.vmId}\n`);
        lost = false;
        back.splice(0).forEach((resolve) => resolve());
      } catch (err) {
        if (isTemporalUnavailable(err) && !lost) {
          lost = true;
          process.stderr.write(
            `\nferry: lost ${who} (${(err as Error).message}); trying again every ${SERVER_CHECK_MS / 1000} s until it answers (Ctrl-C stops watching; the migration goes on)\n`,
          );
        }
      }
      await sleep(SERVER_CHECK_MS);
    }
  })();
  return {
    answering: () => (lost ? new Promise<void>((resolve) => back.push(resolve)) : sleep(SERVER_CHECK_MS)),
    stop: () => {
      stopped = true;
      back = [];
    },
  };
}

/** Wait for the end, print the report (JSON or text) and return the exit code. */
export async function waitAndReport(handle: MigrationHandle, json: boolean | undefined): Promise<number> {
  const report = await waitForEnd(handle, json);
  if (!report) return EXIT.interrupted;
  if (json) printJson(report);
  else process.stdout.write(`${formatReport(report)}\n`);
  return outcomeExit(report);
}

/** Where the VM runs now, as far as Ferry knows: the destination of its last completed migration. */
async function currentHost(ferry: FerryClient, vmId: string): Promise<string> {
  const [last] = await ferry.listMigrations({ vmId, outcome: 'completed', limit: 1 });
  if (!last?.destinationHost) {
    throw new FerryRequestError(`VM ${vmId} has no completed migration that says where it runs: name its host with --from HOST`, 'InvalidArgument');
  }
  return last.destinationHost;
}

function describeProgress(p: MigrationProgress): string {
  const route = `${p.sourceHost} → ${p.destinationHost ?? '?'}`;
  return [
    `${p.vmId}: ${p.phase}, ${p.percent}%  (${route}, ${p.mode}${p.epoch !== null ? `, epoch ${p.epoch}` : ''}${p.round ? `, round ${p.round}` : ''})`,
    `  disk ${formatBytes(p.disk.totalBytes)} (sent ${formatBytes(p.disk.sentBytes)}), memory ${formatBytes(p.memory.totalBytes)} (sent ${formatBytes(p.memory.sentBytes)}), ` +
      `${formatRate(p.transferBytesPerSecond)}, dirty ${p.disk.dirtyBlocks} blocks ${p.memory.dirtyPages} pages, ETA ${p.etaSeconds === null ? '-' : `${p.etaSeconds}s`}`,
    `  ${p.message}`,
    ...(p.incremental ? [`  ${incrementalLine(p.incremental.incremental, p.incremental.fallbackReason)}`] : []),
    ...(p.retrying ? [`  ${formatRetry(p.retrying)}`] : []),
  ].join('\n');
}

function stateExit(s: MigrationState): number {
  if (s.report) return outcomeExit(s.report);
  if (s.error) return s.error.refused ? EXIT.refused : EXIT.error;
  return EXIT.ok;
}

function printState(s: MigrationState): void {
  if (s.report) {
    process.stdout.write(`${formatReport(s.report)}\n`);
  } else if (s.error) {
    process.stdout.write(`${s.vmId}: ${s.error.refused ? 'refused' : s.status.toLowerCase()}: ${s.error.message}\n`);
  } else if (s.progress) {
    process.stdout.write(`${describeProgress(s.progress)}\n`);
  } else if (s.progressUnavailable) {
    process.stdout.write(`${s.vmId}: ${s.status.toLowerCase()}${s.phase ? `, ${s.phase} when Temporal last recorded it` : ''}; no progress: ${s.progressUnavailable}\n`);
  } else {
    process.stdout.write(`${s.vmId}: ${s.status.toLowerCase()} (workflow ${s.workflowId}, no progress yet)\n`);
  }
}

export function migrateCommand(): Command {
  return withConnectionFlags(
    new Command('migrate')
      .description('live-migrate a VM with its disk and memory to another host')
      .argument('<vm>', 'VM id', vmIdArg)
      .requiredOption('--to <host[,host...]>', 'destination host, or candidates tried in order', hostList)
      .option('--from <host>', 'host the VM runs on (default: the destination of its last completed migration)', hostArg)
      .addOption(new Option('--mode <mode>', 'tpm: resume at once, stale blocks follow (short downtime); precopy: copy them in the freeze').choices(['tpm', 'precopy']))
      .addOption(new Option('--incremental <policy>', 'send only blocks written since the last migration between these hosts').choices(['auto', 'off', 'require']))
      .option('--bandwidth <rate>', 'data-plane limit, e.g. 100MiB/s, 1Gbit/s, unlimited (change it later: ferry bandwidth)', parseRate)
      .option('--block-size <size>', 'bitmap block size, a power of two from 4KiB to 1MiB (default 64KiB)', parseSize)
      .addOption(new Option('--cutover <policy>', 'manual: wait in awaiting-cutover for `ferry approve`').choices(['auto', 'manual']))
      .option('--no-host-check', 'start even if the source or a destination has no agent polling now')
      .option('--wait', 'follow the migration (progress bar on stderr) and print its report')
      .option('--json', 'print JSON on stdout (with --wait: the report), no progress bar'),
  ).action(
    ferryAction(async (ferry, vmId: string, f: MigrateFlags) => {
      const input: MigrateVmInput = {
        vmId,
        sourceHost: f.from ?? (await currentHost(ferry, vmId)),
        destinationHosts: f.to,
        mode: f.mode,
        incremental: f.incremental,
        bandwidthBytesPerSecond: f.bandwidth,
        blockBytes: f.blockSize,
        cutover: f.cutover,
      };
      const handle = await ferry.migrate(input, { checkHosts: f.hostCheck });
      if (f.wait) {
        if (!f.json) process.stderr.write(`migrating ${vmId}: ${input.sourceHost} → ${f.to.join(' or ')} (workflow ${handle.workflowId})\n`);
        return waitAndReport(handle, f.json);
      }
      // Without --wait, still surface the workflow's refusals (validation, unknown VM) as exit 4.
      await handle.accepted();
      if (f.json) {
        printJson({ vmId, workflowId: handle.workflowId, sourceHost: input.sourceHost, destinationHosts: f.to, started: true });
        return;
      }
      const lines = [`migrating ${vmId}: ${input.sourceHost} → ${f.to.join(' or ')} (workflow ${handle.workflowId})`, `  follow: ferry status ${vmId} --follow    abort: ferry abort ${vmId}`];
      if (f.cutover === 'manual') lines.push(`  it waits in awaiting-cutover until: ferry approve ${vmId}`);
      process.stdout.write(`${lines.join('\n')}\n`);
    }),
  );
}

export function statusCommand(): Command {
  return withConnectionFlags(
    new Command('status')
      .description("show a VM's latest migration: its progress, or its report once it has ended (exit code: that of its outcome)")
      .argument('<vm>', 'VM id', vmIdArg)
      .option('--follow', 'follow a running migration to its end (progress bar on stderr), then show it')
      .option('--json', 'print JSON on stdout, no progress bar'),
  ).action(
    ferryAction(async (ferry, vmId: string, f: { follow?: boolean; json?: boolean }) => {
      const handle = ferry.getMigration(vmId);
      let state = await handle.state();
      if (f.follow && state.status === 'RUNNING') {
        // its failure, if any, is part of the state read below
        const report = await waitForEnd(handle, f.json).catch(() => undefined);
        if (report === null) return EXIT.interrupted;
        state = await handle.state();
      }
      if (f.json) printJson(state);
      else printState(state);
      return stateExit(state);
    }),
  );
}

export function listCommand(): Command {
  return withConnectionFlags(
    new Command('list')
      .description('list migrations, newest first (Temporal visibility: search attributes)')
      .option('--vm <vm>', 'only this VM')
      .option('--from <host>', 'only from this source host')
      .option('--to <host>', 'only to this destination host')
      .addOption(new Option('--phase <phase>', 'only in this phase').choices(MIGRATION_PHASES))
      .option('--running', 'only running migrations')
      .option('--limit <n>', 'at most this many', (v) => {
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError('must be a whole number >= 1');
        return n;
      }, 50)
      .option('--json', 'print JSON'),
  ).action(
    ferryAction(async (ferry, f: { vm?: string; from?: string; to?: string; phase?: MigrationPhase; running?: boolean; limit: number; json?: boolean }) => {
      const list = await ferry.listMigrations({ vmId: f.vm, sourceHost: f.from, destinationHost: f.to, phase: f.phase, running: f.running ? true : undefined, limit: f.limit });
      if (f.json) return printJson(list);
      if (list.length === 0) return void process.stdout.write('no migrations found\n');
      const time = (d: Date | null) => (d ? d.toISOString().replace(/\.\d+Z$/, 'Z') : '-');
      const rows = list.map((m) => [m.vmId, m.status.toLowerCase(), m.phase ?? '-', m.sourceHost ?? '-', m.destinationHost ?? '-', m.mode ?? '-', time(m.startTime), time(m.closeTime)]);
      process.stdout.write(`${table(['VM', 'STATUS', 'PHASE', 'FROM', 'TO', 'MODE', 'STARTED', 'ENDED'], rows)}\n`);
    }),
  );
}
