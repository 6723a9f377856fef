// `ferry abort`, `ferry approve`, `ferry resolve`, `ferry bandwidth`: steer a running migration.
import { Command } from 'commander';
import { formatBytes } from './progress-view';
import { EXIT, ferryAction, printJson, vmIdArg, withConnectionFlags } from './common';
import { waitAndReport } from './migrate';
import { parseRate } from './units';

export function abortCommand(): Command {
  return withConnectionFlags(
    new Command('abort')
      .description('roll a migration back: the VM keeps running on its source (refused past the commit point)')
      .argument('<vm>', 'VM id', vmIdArg)
      .option('--reason <text>', 'why; recorded in the report', 'aborted by operator')
      .option('--wait', 'wait for the rollback to finish and print the report (exit 0 once rolled back)')
      .option('--json', 'print JSON'),
  ).action(
    ferryAction(async (ferry, vmId: string, f: { reason: string; wait?: boolean; json?: boolean }) => {
      const handle = ferry.getMigration(vmId);
      const { phase } = await handle.abort(f.reason);
      if (f.wait) {
        if (!f.json) process.stderr.write(`abort of ${vmId} accepted in phase ${phase}; rolling back\n`);
        const code = await waitAndReport(handle, f.json);
        return code === EXIT.rolledBack ? EXIT.ok : code; // rolled back is what was asked for
      }
      if (f.json) printJson({ vmId, accepted: true, phase });
      else process.stdout.write(`abort of ${vmId} accepted in phase ${phase}; it rolls back (ferry status ${vmId} --follow)\n`);
    }),
  );
}

export function approveCommand(): Command {
  return withConnectionFlags(
    new Command('approve')
      .description('approve the switchover of a migration started with --cutover manual (refused, with the reason, for any other)')
      .argument('<vm>', 'VM id', vmIdArg),
  ).action(
    ferryAction(async (ferry, vmId: string) => {
      const { phase } = await ferry.getMigration(vmId).approveCutover();
      process.stdout.write(`switchover of ${vmId} approved (phase ${phase})\n`);
    }),
  );
}

export function resolveCommand(): Command {
  return withConnectionFlags(
    new Command('resolve')
      .description(
        'give the last word on a migration that waits for a lost destination: --destination-lost resumes the VM on its source and ' +
          "fences the lost host's copy. DANGER: only when that host is known to be powered off or fenced (see README, Resolving a lost destination)",
      )
      .argument('<vm>', 'VM id', vmIdArg)
      .requiredOption('--destination-lost', 'the destination that stopped answering after the Final message left is gone for good')
      .requiredOption('--reason <text>', 'why you know it is gone (recorded in the workflow history with who and when)')
      .option('--json', 'print JSON'),
  ).action(
    ferryAction(async (ferry, vmId: string, f: { reason: string; json?: boolean }) => {
      const r = await ferry.getMigration(vmId).resolveDestinationLost(f.reason);
      if (f.json) printJson({ vmId, ...r });
      else {
        process.stdout.write(
          `destination ${r.host} of ${vmId} declared lost (epoch ${r.epoch} fenced there); the VM resumes on its source (ferry status ${vmId} --follow)\n`,
        );
      }
    }),
  );
}

export function bandwidthCommand(): Command {
  return withConnectionFlags(
    new Command('bandwidth')
      .description('change the data-plane limit of a running migration')
      .argument('<vm>', 'VM id', vmIdArg)
      .argument('<rate>', 'e.g. 100MiB/s, 1Gbit/s, or unlimited', parseRate),
  ).action(
    ferryAction(async (ferry, vmId: string, rate: number | null) => {
      await ferry.getMigration(vmId).setBandwidth(rate);
      process.stdout.write(`bandwidth of ${vmId}'s migration set to ${rate === null ? 'unlimited' : `${formatBytes(rate)}/s`}\n`);
    }),
  );
}
