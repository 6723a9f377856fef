import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Worker } from '@temporalio/worker';
import { ensureTemporalCli, FERRY_SEARCH_ATTRIBUTES, startDevServer, type DevServer } from '../../scripts/temporal-cli';
import type { echoWorkflow } from '../fixtures/workflows/echo';
import { connectTestClient, connectTestWorkerConnection, uniqueTaskQueue } from '../support/temporal';

describe('Temporal dev server from global setup', () => {
  test('a workflow runs an activity on a worker and returns its output', async () => {
    const taskQueue = uniqueTaskQueue('echo');
    const connection = await connectTestWorkerConnection();
    const { client, close } = await connectTestClient();
    try {
      const worker = await Worker.create({
        connection,
        namespace: 'default',
        taskQueue,
        workflowsPath: path.join(__dirname, '../fixtures/workflows/echo.ts'),
        activities: { echo: async (message: string) => `echo: ${message}` },
      });
      const result = await worker.runUntil(
        client.workflow.execute<typeof echoWorkflow>('echoWorkflow', { taskQueue, workflowId: taskQueue, args: ['hello'] }),
      );
      expect(result).toBe('echo: hello');
    } finally {
      await close();
      await connection.close();
    }
  });

  test("Ferry's search attributes are registered", async () => {
    const { connection, close } = await connectTestClient();
    try {
      const res = await connection.operatorService.listSearchAttributes({ namespace: 'default' });
      const names = Object.keys(res.customAttributes ?? {});
      expect(names).toEqual(expect.arrayContaining(Object.keys(FERRY_SEARCH_ATTRIBUTES)));
      expect(names).toContain('FerryPhase');
    } finally {
      await close();
    }
  });
});

describe('ensureTemporalCli', () => {
  const saved = process.env.FERRY_TEMPORAL_CLI;
  afterEach(() => {
    if (saved === undefined) delete process.env.FERRY_TEMPORAL_CLI;
    else process.env.FERRY_TEMPORAL_CLI = saved;
  });

  test('FERRY_TEMPORAL_CLI pointing at a missing file is a clear error', async () => {
    process.env.FERRY_TEMPORAL_CLI = path.join(os.tmpdir(), 'ferry-no-such-dir', 'temporal');
    await expect(ensureTemporalCli()).rejects.toThrow(/FERRY_TEMPORAL_CLI=.*no such file/);
  });

  test('FERRY_TEMPORAL_CLI pointing at a non-executable file is a clear error', async () => {
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ferry-cli-'));
    try {
      const file = path.join(dir, 'temporal');
      await fsp.writeFile(file, '', { mode: 0o644 });
      process.env.FERRY_TEMPORAL_CLI = file;
      await expect(ensureTemporalCli()).rejects.toThrow(/FERRY_TEMPORAL_CLI=.*not an executable/);
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('startDevServer', () => {
  let cliPath = '';
  beforeAll(async () => {
    const cli = await ensureTemporalCli();
    cliPath = cli.path; // '' on route 'sdk': nothing to launch, the tests below then skip
  });

  /** Stops whatever a start that should have failed returned anyway, so no server leaks. */
  async function expectStartFailure(start: Promise<DevServer>, pattern: RegExp): Promise<void> {
    const outcome = await start.then(
      async (server) => {
        await server.stop();
        return null;
      },
      (err: unknown) => err,
    );
    expect(outcome).toBeInstanceOf(Error);
    expect((outcome as Error).message).toMatch(pattern);
  }

  test('a server that exits at startup fails with its own output', async () => {
    if (!cliPath) return;
    const dbFile = path.join(os.tmpdir(), 'ferry-no-such-dir', 'temporal.db');
    await expectStartFailure(
      startDevServer({ cliPath, dbFile, uiPort: null, searchAttributes: {} }),
      /exited early[\s\S]*last server output[\s\S]*ferry-no-such-dir/,
    );
  });

  test('a port already taken is refused before anything is started', async () => {
    if (!cliPath) return;
    const holder = net.createServer();
    await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
    const { port } = holder.address() as net.AddressInfo;
    try {
      await expectStartFailure(startDevServer({ cliPath, port, uiPort: null }), new RegExp(`port ${port} .*already in use`));
    } finally {
      await new Promise((resolve) => holder.close(resolve));
    }
  });
});
