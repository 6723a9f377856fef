// A Temporal dev server of one test file (its own SQLite file and port) with a cluster on it, for tests
// that kill the server and start it again; stop() cleans up, also after a failure.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { ensureTemporalCli, startDevServer, freePort, type DevServer } from '../../scripts/temporal-cli';
import { LocalCluster } from '../../harness/cluster';
import { TEST_TASK_QUEUE } from './cluster';
import { FerryClient } from '../../client/ferry-client';

export class OwnServer {
  private constructor(
    readonly dir: string,
    private readonly start: () => Promise<DevServer>,
    public server: DevServer,
    readonly cluster: LocalCluster,
  ) {}

  static async start(hosts: string[]): Promise<OwnServer> {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-own-server-'));
    const cliPath = (await ensureTemporalCli()).path;
    const port = await freePort();
    const start = () => startDevServer({ cliPath, dbFile: path.join(dir, 'temporal.db'), port, uiPort: null });
    const server = await start();
    const cluster = await LocalCluster.start({ temporalAddress: server.address, hosts, root: dir, taskQueue: TEST_TASK_QUEUE }).catch(async (err: unknown) => {
      await server.stop();
      throw err;
    });
    return new OwnServer(dir, start, server, cluster);
  }

  get ferry(): FerryClient {
    return this.cluster.ferryClient();
  }

  /** kill -9 of the server; it is gone once this resolves. */
  async kill(): Promise<void> {
    process.kill(this.server.pid, 'SIGKILL');
    await this.server.exited;
  }

  /** The server again, on the same port and SQLite file. */
  async restart(): Promise<void> {
    this.server = await this.start();
  }

  async stop(): Promise<void> {
    await this.cluster.stop();
    await this.server.stop();
    await fs.rm(this.dir, { recursive: true, force: true });
  }
}
