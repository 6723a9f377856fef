// The admission load test at CI size (bench/admission/load.ts runs it at 1,000): migrations with no
// data queue for the cluster scope on a Temporal server of their own; none is lost, the cluster limit
// is never exceeded, and the scope continues as new instead of growing one long history.
import { ensureTemporalCli, startDevServer, type DevServer } from '../../scripts/temporal-cli';
import { runAdmissionLoad } from '../../bench/admission/load';

jest.setTimeout(480_000);

let server: DevServer | null = null;

afterAll(async () => {
  await server?.stop();
});

it('grants every queued migration its slots, within the limit, continuing as new', async () => {
  const cli = await ensureTemporalCli();
  server = await startDevServer({ cliPath: cli.path, uiPort: null });
  const result = await runAdmissionLoad({ address: server.address, migrations: 40, hosts: 10, clusterLimit: 8, historyLimit: 100, timeoutMs: 400_000 });
  process.stderr.write(`admission load: ${JSON.stringify(result)}\n`);
  expect(result.finished).toBe(40);
  expect(result.maxHoldersSeen).toBeGreaterThan(0);
  expect(result.maxHoldersSeen).toBeLessThanOrEqual(8);
  expect(result.clusterRuns).toBeGreaterThan(1);
  // A run may pass the limit by the events of the workflow task in which it decides to continue.
  expect(result.maxRunHistoryEvents).toBeLessThan(100 + 200);
  expect(result.grantsPerSecond).toBeGreaterThan(0);
});
