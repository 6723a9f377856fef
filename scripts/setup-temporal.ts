/**
 * `npm run setup:temporal`: makes sure the pinned Temporal CLI is available (see temporal-cli.ts),
 * installing it into the cache if needed, and says where it came from.
 */
import { ensureTemporalCli } from './temporal-cli';

async function main(): Promise<void> {
  const started = Date.now();
  const cli = await ensureTemporalCli({ log: (line) => process.stderr.write(`[setup:temporal] ${line}\n`) });
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  if (cli.route === 'sdk') {
    console.log(
      `Temporal CLI: not provisioned (route sdk, ${seconds} s). Tests will let the Temporal SDK download ` +
        `its dev server, which needs internet access; set FERRY_TEMPORAL_CLI to avoid that.`,
    );
    return;
  }
  console.log(`Temporal CLI ${cli.version}: route ${cli.route}, ${cli.path} (${seconds} s)`);
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(`setup:temporal failed: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
