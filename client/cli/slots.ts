// `ferry slots`: how many migrations hold or wait for a slot, cluster-wide and per host.
import { Command } from 'commander';
import { ferryAction, printJson, table, withConnectionFlags } from './common';

export function slotsCommand(): Command {
  return withConnectionFlags(
    new Command('slots')
      .description('show the migration slots (agents\' --max-migrations and --cluster-max-migrations): holders and waiting migrations')
      .argument('[hosts...]', 'hosts to show besides the cluster-wide slots')
      .option('--json', 'print JSON'),
  ).action(
    ferryAction(async (ferry, hosts: string[], f: { json?: boolean }) => {
      const scopes = [null, ...hosts];
      const states = await Promise.all(scopes.map((h) => ferry.slots(h)));
      if (f.json) return printJson(scopes.map((host, i) => ({ scope: host ?? 'cluster', state: states[i] })));
      const runs = (list: { holder: { workflowId: string } }[]) => list.map((r) => r.holder.workflowId.replace(/^migrate-/, '')).join(' ') || '-';
      const rows = scopes.map((host, i) => {
        const s = states[i];
        return [host ?? '(cluster)', s ? `${s.holders.length}/${s.limit}` : 'idle', s ? runs(s.holders) : '-', s ? runs(s.waiting) : '-'];
      });
      process.stdout.write(`${table(['SCOPE', 'IN USE', 'HOLDING (VM)', 'WAITING (VM)'], rows)}\n`);
    }),
  );
}
