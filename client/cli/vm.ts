// `ferry vm create|list|inspect|start|pause|resume|verify|destroy`: the VMs of a host (simulated or QEMU), through its agent.
import { Command, Option } from 'commander';
import type { VmSummary } from '../../activities';
import { DEFAULT_OPS_PER_SECOND, PAGE_BYTES, SECTOR_BYTES, WORKLOADS, type Workload } from '../../common/types';
import { formatBytes } from './progress-view';
import { EXIT, ferryAction, hostArg, printJson, table, vmIdArg, withConnectionFlags } from './common';
import { parseCount, sizeMultipleOf } from './units';

interface CreateFlags {
  host: string;
  disk: number;
  memory: number;
  workload: Workload;
  seed?: number;
  opsPerSecond?: number;
  fill?: boolean;
  vcpus?: number;
  kernel?: string;
  initrd?: string;
  append?: string;
  json?: boolean;
}

const WORKLOAD_HELP = [
  'guest workload: idle (a timer tick, one page dirty), memhog (stamps memory all over),',
  'seqwrite (256 KiB sequential writes), randwrite (4 KiB random writes), mixed (70% reads',
  'in a drifting 4 MiB window), readmostly (95% reads of a 1 MiB hot set)',
].join(' ');
const RATE_HELP = `guest operations per second, 0 = as fast as it can (default by workload: ${WORKLOADS.map((w) => `${w} ${DEFAULT_OPS_PER_SECOND[w]}`).join(', ')})`;

function ownership(s: VmSummary): string {
  return s.ownership ? `${s.ownership.state}@${s.ownership.epoch}` : '-';
}

/** The run state, and how a dead VM's process ended ("crashed (SIGKILL)"). */
function runState(s: VmSummary): string {
  if (!s.exit || s.state !== 'crashed') return s.state;
  return `crashed (${s.exit.signal ?? (s.exit.code !== null ? `exit ${s.exit.code}` : 'exit unknown')})`;
}

function describe(s: VmSummary): string {
  return [
    `${s.vmId} on ${s.host}: ${runState(s)}${s.pid ? ` (pid ${s.pid})` : ''}, ownership ${ownership(s)}`,
    `  disk ${formatBytes(s.diskBytes)}, memory ${formatBytes(s.memoryBytes)}, workload ${s.workload} (seed ${s.seed}, ${s.opsPerSecond || 'unlimited'} ops/s)`,
    `  runs under ${s.accel}${s.exit ? `; last exit: ${s.exit.signal ? `signal ${s.exit.signal}` : `status ${s.exit.code ?? 'unknown'}`} at ${s.exit.at}` : ''}`,
    s.guest
      ? `  guest: ops ${s.guest.ops}, reads ${s.guest.reads}, writes ${s.guest.writes}, violations ${s.guest.violations}, longest heartbeat gap ${s.guest.maxGapMs.toFixed(1)} ms${s.throttle ? `, throttle ${Math.round(s.throttle * 100)}%` : ''}`
      : '  guest: no report (no guest runs)',
  ].join('\n');
}

export function vmCommand(): Command {
  const vm = new Command('vm').description('create, list, inspect and destroy VMs on a host (simulated or QEMU), through its agent');

  vm.addCommand(
    withConnectionFlags(
      new Command('create')
        .description('create a VM on a host and start its guest workload')
        .argument('<vm>', 'VM id (a-z, 0-9, ".", "_", "-")', vmIdArg)
        .requiredOption('--host <host>', 'host whose agent creates the VM', hostArg)
        .requiredOption('--disk <size>', 'disk size, a whole number of 512-byte sectors (e.g. 1GiB)', sizeMultipleOf(SECTOR_BYTES, '512-byte sectors'))
        .requiredOption('--memory <size>', 'memory size, a whole number of 4 KiB pages (e.g. 256MiB)', sizeMultipleOf(PAGE_BYTES, '4 KiB pages'))
        .addOption(new Option('--workload <name>', WORKLOAD_HELP).choices(WORKLOADS).makeOptionMandatory())
        .option('--seed <n>', 'seed of the deterministic workload (default 1)', parseCount('--seed'))
        .option('--ops-per-second <n>', RATE_HELP, parseCount('--ops-per-second'))
        .option('--fill', 'write every block once before the workload starts')
        .option('--vcpus <n>', 'virtual CPUs (QEMU; default 1)', parseCount('--vcpus'))
        .option('--kernel <file>', "a kernel of your own on the host (QEMU; default: Ferry's guest kernel)")
        .option('--initrd <file>', "an initramfs of your own on the host (QEMU; without Ferry's guest program the VM has no verify)")
        .option('--append <cmdline>', "kernel command line (QEMU; added to Ferry's guest parameters when its kernel and initramfs are used)")
        .option('--json', 'print the VM as JSON'),
    ).action(
      ferryAction(async (ferry, vmId: string, f: CreateFlags) => {
        const s = await ferry.hostCommand(f.host, 'vmCreate', {
          vmId,
          diskBytes: f.disk,
          memoryBytes: f.memory,
          workload: f.workload,
          seed: f.seed,
          opsPerSecond: f.opsPerSecond,
          fill: f.fill,
          vcpus: f.vcpus,
          boot: f.kernel || f.initrd || f.append ? { kernel: f.kernel, initrd: f.initrd, append: f.append } : undefined,
        });
        if (f.json) printJson(s);
        else process.stdout.write(`created ${describe(s)}\n`);
      }),
    ),
  );

  vm.addCommand(
    withConnectionFlags(
      new Command('list').description('list the VMs of a host').requiredOption('--host <host>', 'host to ask', hostArg).option('--json', 'print JSON'),
    ).action(
      ferryAction(async (ferry, f: { host: string; json?: boolean }) => {
        const vms = await ferry.hostCommand(f.host, 'vmList');
        if (f.json) return printJson(vms);
        if (vms.length === 0) return void process.stdout.write(`no VMs on ${f.host}\n`);
        // A VM whose process is gone has no guest counters: its state says what happened, not OPS 0.
        const live = (v: VmSummary) => v.pid !== null && v.guest !== null;
        const rows = vms.map((v) => [v.vmId, runState(v), ownership(v), formatBytes(v.diskBytes), formatBytes(v.memoryBytes), v.workload, live(v) ? String(v.guest!.ops) : '-']);
        process.stdout.write(`${table(['VM', 'STATE', 'OWNERSHIP', 'DISK', 'MEMORY', 'WORKLOAD', 'OPS'], rows)}\n`);
      }),
    ),
  );

  // Commands on one VM that print its state afterwards.
  for (const [name, command, description, prefix] of [
    ['inspect', 'vmInspect', 'show the state of one VM: process, ownership epoch, guest counters', ''],
    ['start', 'vmStart', 'start a VM whose process is not running (after a crash of the VM process, say)', 'started '],
    ['pause', 'vmPause', 'pause the guest (a migration of a paused VM moves it paused: a cold migration)', 'paused '],
    ['resume', 'vmResume', 'let a paused guest run again', 'resumed '],
  ] as const) {
    vm.addCommand(
      withConnectionFlags(
        new Command(name).description(description).argument('<vm>', 'VM id', vmIdArg).requiredOption('--host <host>', 'host the VM is on', hostArg).option('--json', 'print JSON'),
      ).action(
        ferryAction(async (ferry, vmId: string, f: { host: string; json?: boolean }) => {
          const s = await ferry.hostCommand(f.host, command, { vmId });
          if (f.json) printJson(s);
          else process.stdout.write(`${prefix}${describe(s)}\n`);
        }),
      ),
    );
  }

  vm.addCommand(
    withConnectionFlags(
      new Command('verify')
        .description("check the VM's data where it runs (simulator: the guest runs on to an operation count and halts, then disk and memory are compared with a reference run that never migrated); exit 1 on a violation")
        .argument('<vm>', 'VM id', vmIdArg)
        .requiredOption('--host <host>', 'host the VM runs on', hostArg)
        .option('--json', 'print JSON'),
    ).action(
      ferryAction(async (ferry, vmId: string, f: { host: string; json?: boolean }) => {
        const r = await ferry.hostCommand(f.host, 'vmVerify', { vmId });
        if (f.json) printJson(r);
        else {
          const verdict = r.violations === 0 ? 'data correct' : `${r.violations} violation(s)`;
          process.stdout.write(`${vmId} on ${f.host}: ${verdict} (${r.checked} blocks checked)\n  ${r.method}${r.details ? `\n  ${r.details}` : ''}\n`);
        }
        return r.violations === 0 ? EXIT.ok : EXIT.error;
      }),
    ),
  );

  vm.addCommand(
    withConnectionFlags(
      new Command('destroy').description('stop a VM and delete its disk, memory and ownership record').argument('<vm>', 'VM id', vmIdArg).requiredOption('--host <host>', 'host the VM is on', hostArg),
    ).action(
      ferryAction(async (ferry, vmId: string, f: { host: string }) => {
        await ferry.hostCommand(f.host, 'vmDestroy', { vmId });
        process.stdout.write(`destroyed ${vmId} on ${f.host}\n`);
      }),
    ),
  );

  return vm;
}
