// `ferry bases list|delete`: the disks hosts keep for incremental migration back.
import { Command } from 'commander';
import { formatBytes } from './progress-view';
import { ferryAction, hostArg, printJson, table, vmIdArg, withConnectionFlags } from './common';

export function basesCommand(): Command {
  const bases = new Command('bases').description('list and delete the bases a host keeps so a VM can move back incrementally');

  bases.addCommand(
    withConnectionFlags(new Command('list').description('list the bases of a host').requiredOption('--host <host>', 'host to ask', hostArg).option('--json', 'print JSON')).action(
      ferryAction(async (ferry, f: { host: string; json?: boolean }) => {
        const all = await ferry.hostCommand(f.host, 'baseList');
        if (f.json) return printJson(all);
        if (all.length === 0) return void process.stdout.write(`no bases on ${f.host}\n`);
        const rows = all.map((b) => [b.vmId, formatBytes(b.diskBytes), formatBytes(b.blockBytes), b.lineage, b.createdAt, b.inUseBy ?? '-']);
        process.stdout.write(`${table(['VM', 'DISK', 'BLOCK', 'LINEAGE (MIGRATION)', 'KEPT AT', 'IN USE BY'], rows)}\n`);
      }),
    ),
  );

  bases.addCommand(
    withConnectionFlags(
      new Command('delete')
        .description('delete the base of a VM (refused while a migration builds on it); moving the VM back is then a full copy')
        .argument('<vm>', 'VM id', vmIdArg)
        .requiredOption('--host <host>', 'host that keeps the base', hostArg),
    ).action(
      ferryAction(async (ferry, vmId: string, f: { host: string }) => {
        await ferry.hostCommand(f.host, 'baseDelete', { vmId });
        process.stdout.write(`deleted the base of ${vmId} on ${f.host}\n`);
      }),
    ),
  );
  return bases;
}
