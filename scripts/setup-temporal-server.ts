/**
 * `npm run setup:temporal-server`: provisions what the production-server and network tests (and
 * `ferry server --postgres`) run: the Temporal server 1.29.1 and its SQL tool built with `go install`
 * into the cache (cold: about six minutes on two cores, niced; cached afterwards), Toxiproxy likewise,
 * and PostgreSQL from Debian (apt-get, as root, when missing). Jest's global setup starts it in the
 * background at the start of `npm test`, so the build overlaps the rest of the suite.
 */
import { performance } from 'node:perf_hooks';
import { TOXIPROXY, ensureGoTool } from './go-tools';
import { ensurePostgres } from './postgres';
import { ensureTemporalServer } from './temporal-server';

const t0 = performance.now();
const log = (line: string) => process.stderr.write(`[setup:temporal-server ${((performance.now() - t0) / 1000).toFixed(0)} s] ${line}\n`);

async function main(): Promise<void> {
  const [server, toxiproxy, postgres] = await Promise.all([
    ensureTemporalServer({ log }),
    ensureGoTool(TOXIPROXY, { log }),
    ensurePostgres({ log }).catch((err: Error) => {
      log(`PostgreSQL: ${err.message}`);
      return null;
    }),
  ]);
  console.log(`Temporal server: ${server.bin('temporal-server')} (${server.route})`);
  console.log(`Toxiproxy: ${toxiproxy.bin('toxiproxy-server')} (${toxiproxy.route})`);
  console.log(`PostgreSQL: ${postgres ? postgres.dir : 'missing (see above)'}`);
  console.log(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  if (!postgres) process.exitCode = 1;
}

main().catch((err: unknown) => {
  console.error(`setup:temporal-server failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
