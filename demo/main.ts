// `npm start`: the whole product on one machine. A local Temporal server with its UI, two hosts, a VM
// under load (a QEMU guest running Linux where QEMU can be provisioned, else the simulator), a live
// migration there and an incremental one back, and the guest's own check of every block it wrote.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { Command, Option } from 'commander';
import { ensureTemporalCli, startDevServer, type DevServer } from '../scripts/temporal-cli';
import { LocalCluster } from '../harness/cluster';
import { guestWorking } from '../harness/guest-working';
import { ensureQemuAssets } from '../scripts/qemu-assets';
import type { DriverKind } from '../hypervisor';
import { FerryClient } from '../client/ferry-client';
import { followMigration, formatBytes, formatReport } from '../client/cli/progress-view';
import { WORKLOADS, type Workload } from '../common/types';
import type { MigrationReport } from '../common/migration';

interface DemoOptions {
  keep: boolean;
  hypervisor: 'auto' | DriverKind;
  json: boolean;
  diskMib: string;
  memoryMib: string;
  workload: Workload;
}

const MiB = 1024 * 1024;

async function main(opts: DemoOptions): Promise<number> {
  const say = (line: string) => {
    if (!opts.json) process.stderr.write(`${line}\n`);
  };
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-demo-'));
  let server: DevServer | null = null;
  let cluster: LocalCluster | null = null;
  const cleanup = async () => {
    await cluster?.stop().catch(() => undefined);
    await server?.stop().catch(() => undefined);
    await fs.rm(root, { recursive: true, force: true }).catch(() => undefined);
  };
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      say(`\n${signal}: stopping every process the demo started`);
      void cleanup().then(() => process.exit(130));
    });
  }

  try {
    say('1/6 provisioning the Temporal CLI (dev server with SQLite and the Web UI)');
    const cli = await ensureTemporalCli({ log: (l) => say(`    ${l}`) });
    server = await startDevServer({ cliPath: cli.path, dbFile: path.join(root, 'temporal.db') });
    say(`    Temporal ${server.address}, Web UI ${server.uiUrl}`);

    const hypervisor = await chooseHypervisor(opts.hypervisor, say);
    say(`2/6 starting two host agents (alpha, beta) on the ${hypervisor === 'qemu' ? 'QEMU' : 'simulated'} hypervisor`);
    cluster = await LocalCluster.start({ temporalAddress: server.address, hosts: ['alpha', 'beta'], root, env: { FERRY_HYPERVISOR: hypervisor } });
    const ferry = cluster.ferryClient();

    const vm = {
      vmId: 'demo-vm',
      diskBytes: Number(opts.diskMib) * MiB,
      memoryBytes: Number(opts.memoryMib) * MiB,
      workload: opts.workload,
      seed: 42,
      opsPerSecond: 300,
      fill: true,
    };
    say(`3/6 creating ${vm.vmId} on alpha: ${formatBytes(vm.diskBytes)} disk filled with data, ${formatBytes(vm.memoryBytes)} memory, ${vm.workload} guest at ${vm.opsPerSecond} ops/s`);
    await ferry.hostCommand('alpha', 'vmCreate', vm);
    await guestWorking(ferry, 'alpha', vm.vmId);

    const reports: MigrationReport[] = [];
    say('4/6 live migration alpha → beta (three-phase: precopy, freeze-and-copy, postcopy)');
    reports.push(await follow(ferry, { vmId: vm.vmId, sourceHost: 'alpha', destinationHosts: ['beta'] }, opts.json));
    if (!opts.json) say(formatReport(reports[0]));
    await guestWorking(ferry, 'beta', vm.vmId);

    say('5/6 migration back beta → alpha');
    reports.push(await follow(ferry, { vmId: vm.vmId, sourceHost: 'beta', destinationHosts: ['alpha'] }, opts.json));
    if (!opts.json) say(formatReport(reports[1]));

    say('6/6 verifying the guest: every block it wrote, read back and checked');
    const verified = await ferry.hostCommand('alpha', 'vmVerify', { vmId: vm.vmId });
    const guest = (await ferry.hostCommand('alpha', 'vmInspect', { vmId: vm.vmId })).guest;
    const final = { ops: guest?.ops ?? 0, violations: verified.violations };
    const equal = verified.violations === 0;

    const summary = {
      temporal: server.address,
      ui: server.uiUrl,
      migrations: reports.map((r) => ({
        from: r.sourceHost,
        to: r.destinationHost,
        outcome: r.outcome,
        mode: r.mode,
        incremental: r.incremental,
        downtime_ms: r.downtimeMs,
        total_ms: r.totalMs,
        disk_bytes: r.diskBytesSent,
        memory_bytes: r.memoryBytesSent,
        skipped_blocks: r.skippedBlocks,
      })),
      hypervisor,
      guest: { ops: final.ops, violations: final.violations, verified_by: verified.method },
    };
    if (opts.json) {
      process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`);
    } else {
      const [there, back] = reports;
      say('');
      say('Report');
      say(`  alpha → beta: downtime ${there.downtimeMs} ms, total ${(there.totalMs / 1000).toFixed(2)} s, sent ${formatBytes(there.diskBytesSent + there.memoryBytesSent)}`);
      say(`  beta → alpha: downtime ${back.downtimeMs} ms, total ${(back.totalMs / 1000).toFixed(2)} s, sent ${formatBytes(back.diskBytesSent + back.memoryBytesSent)}${back.incremental ? ' (incremental)' : ''}`);
      say(`  guest (${hypervisor === 'qemu' ? 'QEMU, Linux' : 'simulated'}): ${final.ops} operations, ${final.violations} violations ${equal ? '(clean)' : '(DATA LOST)'}`);
      say(`    checked by ${verified.method}: ${verified.details}`);
      say(`  Temporal Web UI: ${server.uiUrl}/namespaces/default/workflows`);
    }
    const ok = equal && final.violations === 0 && reports.every((r) => r.outcome === 'completed');
    if (opts.keep) {
      say('--keep: everything stays up; press Ctrl-C to stop it');
      await new Promise(() => undefined);
    }
    return ok ? 0 : 1;
  } finally {
    if (!opts.keep) await cleanup();
  }
}

/** QEMU where it can be provisioned (`npm run setup:qemu`), else the simulator, saying why. */
async function chooseHypervisor(choice: DemoOptions['hypervisor'], say: (line: string) => void): Promise<DriverKind> {
  if (choice === 'sim') return 'sim';
  say('    provisioning QEMU and the guest (once, into ~/.cache/ferry/qemu)');
  const assets = await ensureQemuAssets({ log: (l) => say(`    ${l}`) }).catch((err: Error) => ({ missing: err.message }));
  if (!('missing' in assets)) return 'qemu';
  if (choice === 'qemu') throw new Error(`--hypervisor qemu: ${assets.missing}`);
  say(`    QEMU cannot be provisioned here (${assets.missing}): the demo runs on the simulated hypervisor`);
  return 'sim';
}

async function follow(ferry: FerryClient, input: { vmId: string; sourceHost: string; destinationHosts: string[] }, quiet: boolean): Promise<MigrationReport> {
  const handle = await ferry.migrate(input);
  return quiet ? handle.result() : followMigration(handle);
}

const program = new Command('ferry-demo')
  .description('Run Ferry end to end on this machine: Temporal server and UI, two hosts, a VM under load, a migration there and back')
  .option('--keep', 'leave the server, agents and VM running to explore the UI (Ctrl-C stops them)', false)
  .option('--json', 'print the report as JSON on stdout', false)
  .option('--disk-mib <n>', 'VM disk size in MiB', '256')
  .option('--memory-mib <n>', 'VM memory size in MiB (a QEMU guest needs at least 64)', '128')
  .addOption(new Option('--hypervisor <kind>', 'auto: QEMU where it can be provisioned, else the simulator').choices(['auto', 'sim', 'qemu']).default('auto'))
  .option('--workload <name>', `guest workload: ${WORKLOADS.join(', ')}`, 'randwrite')
  .action(async (opts: DemoOptions) => {
    process.exitCode = await main(opts);
  });

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`ferry demo failed: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
