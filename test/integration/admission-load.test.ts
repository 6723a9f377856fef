// The admission load test at CI size (bench/admission/load.ts runs it at 1,000): migrations with no
// data queue for the cluster scope on a Temporal server of their own; none is lost, the cluster limit
// is never exceeded, and the scope continues as new instead of growing one long history. And the
// signals a scope's run finds waiting at its first workflow task (the case after every continue-as-new
// under load) are applied in the order they were sent.
import { randomBytes } from 'node:crypto';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection, Worker } from '@temporalio/worker';
import { ensureTemporalCli, startDevServer, type DevServer } from '../../scripts/temporal-cli';
import { runAdmissionLoad } from '../../bench/admission/load';
import { admissionStateQuery, releaseSlotSignal, requestSlotSignal, type AdmissionState, type SlotRequest } from '../../workflows/definitions';
import { grantsQuery } from '../fixtures/workflows/slot-holder';
import { until } from '../support/host-checks';

jest.setTimeout(480_000);

let server: DevServer;

beforeAll(async () => {
  const cli = await ensureTemporalCli();
  server = await startDevServer({ cliPath: cli.path, uiPort: null });
});

afterAll(async () => {
  await server?.stop();
});

it('a re-request sent after a release, both waiting for the first task of a run, is granted (not withdrawn by the release)', async () => {
  const tag = randomBytes(3).toString('hex');
  const connection = await Connection.connect({ address: server.address });
  const native = await NativeConnection.connect({ address: server.address });
  const client = new Client({ connection });
  const workflowsPath = require.resolve('../fixtures/workflows/slot-holder');
  const holderQueue = `holder-${tag}`;
  const scopeQueue = `scope-${tag}`;
  const holderWorker = await Worker.create({ connection: native, taskQueue: holderQueue, workflowsPath });
  const holderRun = holderWorker.run();
  let scopeRun: Promise<void> | null = null;
  let scopeWorker: Worker | null = null;
  try {
    const holder = await client.workflow.start('slotHolder', { workflowId: `holder-${tag}`, taskQueue: holderQueue });
    const self = { workflowId: holder.workflowId, runId: holder.firstExecutionRunId };
    const request = (ticket: number): SlotRequest => ({ holder: self, ticket, limit: 4 });
    const initial: AdmissionState = { scope: `host-${tag}`, limit: 4, holders: [], waiting: [] };
    // No worker polls the scope's queue yet: all three signals wait for the run's first task, as the
    // fast path of Slots.acquire sends them (ask, give back the later scopes, ask again).
    const scope = await client.workflow.signalWithStart('admission', {
      workflowId: `scope-${tag}`, taskQueue: scopeQueue, args: [initial], signal: requestSlotSignal, signalArgs: [request(2)],
    });
    await scope.signal(releaseSlotSignal, { ...self, ticket: 2 });
    await scope.signal(requestSlotSignal, request(4));
    scopeWorker = await Worker.create({ connection: native, taskQueue: scopeQueue, workflowsPath });
    scopeRun = scopeWorker.run();
    await until('the grant of ticket 4', async () => (await holder.query(grantsQuery)).some((g) => g.ticket === 4), 30_000);
    const state = await scope.query(admissionStateQuery);
    expect(state.holders.map((h) => [h.holder.workflowId, h.ticket])).toEqual([[self.workflowId, 4]]);
    expect(state.waiting).toEqual([]);
    await holder.terminate('test over');
    await scope.terminate('test over');
  } finally {
    scopeWorker?.shutdown();
    holderWorker.shutdown();
    await Promise.allSettled([holderRun, scopeRun]);
    await native.close();
    await connection.close();
  }
});

it('grants every queued migration its slots, within the limit, continuing as new', async () => {
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
