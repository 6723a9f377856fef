// What a platform team writes to move a VM: `npx tsx examples/migrate.ts VM FROM TO` (or set
// FERRY_VM, FERRY_FROM, FERRY_TO). It connects like the Temporal CLI: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE...
import { setTimeout as sleep } from 'node:timers/promises';
import { connectFerry, formatReport } from '../client'; // in your project: from 'ferry'

async function main(vmId: string, from: string, to: string): Promise<void> {
  const ferry = await connectFerry();
  const migration = await ferry.migrate({ vmId, sourceHost: from, destinationHosts: [to] });
  const result = migration.result();
  for (let done = false; !done; done = await Promise.race([result.then(() => true, () => true), sleep(1000, false)])) {
    const p = await migration.progress();
    console.log(`${p.phase} ${p.percent}%: ${p.message}`);
  }
  const report = await result;
  console.log(formatReport(report));
  await ferry.close();
  process.exitCode = report.outcome === 'completed' ? 0 : 3;
}

const [vm = process.env.FERRY_VM, from = process.env.FERRY_FROM, to = process.env.FERRY_TO] = process.argv.slice(2);
if (!vm || !from || !to) {
  console.error('usage: tsx examples/migrate.ts VM FROM_HOST TO_HOST (or FERRY_VM, FERRY_FROM, FERRY_TO)');
  process.exit(2);
}
main(vm, from, to).catch((err: Error) => {
  console.error(`${err.name}: ${err.message}`);
  process.exit(1);
});
