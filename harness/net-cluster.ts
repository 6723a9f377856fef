// A cluster whose hosts each have a network of their own (harness/netns.ts): every agent in its own
// namespace, the Temporal server (the dev server on SQLite, or the production server on PostgreSQL) in
// another, and a Toxiproxy in front of each host's data plane. Agents reach Temporal and each other over
// the lab's /24; this process reaches Temporal through a forward. The network can then be shaped
// (rate, round-trip time) and cut: a host off Temporal with its data plane up, or the reverse.
import path from 'node:path';
import os from 'node:os';
import { promises as fs } from 'node:fs';
import { LocalCluster, type ClusterOptions } from './cluster';
import { NetLab, type Forward } from './netns';
import { Toxiproxy } from './toxiproxy';
import { FerryClient } from '../client/ferry-client';
import { ensureTemporalCli, startDevServer, type DevServer, type LogFn } from '../scripts/temporal-cli';
import { ensurePostgres, PostgresCluster } from '../scripts/postgres';
import { defaultPorts, ensureTemporalServer, parsePostgresUrl, setupSchema, startTemporalServer, type TemporalServer } from '../scripts/temporal-server';

export const TEMPORAL_HOST = 'temporal';
const FRONTEND_PORT = 7233;
/** Each host's data plane as the other hosts see it: Toxiproxy on the host's address. */
const DATA_PORT = 7400;
/** Where the agent itself listens, on its namespace's loopback. */
const AGENT_PORT = 7500;

export type ServerKind = 'dev' | 'postgres';

export interface NetClusterOptions {
  hosts: string[];
  /** The dev server (SQLite file) or the production server on PostgreSQL. */
  server?: ServerKind;
  root?: string;
  env?: ClusterOptions['env'];
  metrics?: boolean;
  log?: LogFn;
}

/** The Temporal server of the lab: kill -9 and start again on the same database. */
export interface LabTemporal {
  kind: ServerKind;
  /** Where this process reaches it (a forward into its namespace). */
  address: string;
  /** Where the hosts reach it. */
  labAddress: string;
  pid(): number;
  restart(downMs: number): Promise<void>;
  stop(): Promise<void>;
}

export class NetCluster {
  private constructor(
    readonly lab: NetLab,
    readonly root: string,
    readonly temporal: LabTemporal,
    readonly toxiproxies: Map<string, Toxiproxy>,
    readonly cluster: LocalCluster,
    readonly ferry: FerryClient,
    /** The PostgreSQL of the production server (null for the dev server). */
    readonly postgres: PostgresCluster | null,
    private readonly forwards: Forward[],
  ) {}

  static async start(opts: NetClusterOptions): Promise<NetCluster> {
    const root = opts.root ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-net-')));
    await fs.mkdir(root, { recursive: true });
    const lab = await NetLab.create();
    const forwards: Forward[] = [];
    const toxiproxies = new Map<string, Toxiproxy>();
    let temporal: LabTemporal | null = null;
    let postgres: PostgresCluster | null = null;
    try {
      const t = await lab.addHost(TEMPORAL_HOST);
      for (const h of opts.hosts) await lab.addHost(h);
      const forward = await lab.forward(TEMPORAL_HOST, `${t.address}:${FRONTEND_PORT}`);
      forwards.push(forward);
      if (opts.server === 'postgres') {
        ({ temporal, postgres } = await productionServer(lab, root, forward.address, opts.log));
      } else {
        temporal = await devServer(lab, root, forward.address, opts.log);
      }
      // Agents listen on their namespace's loopback: the other hosts reach them only through Toxiproxy.
      for (const h of opts.hosts) {
        const proxy = await Toxiproxy.start(lab, h, { log: opts.log });
        toxiproxies.set(h, proxy);
        await proxy.createProxy({ name: 'dataplane', listen: `${lab.host(h).address}:${DATA_PORT}`, upstream: `127.0.0.1:${AGENT_PORT}` });
      }
      const labTemporal = temporal;
      const cluster = await LocalCluster.start({
        temporalAddress: temporal.address,
        hosts: opts.hosts,
        root,
        env: opts.env,
        metrics: opts.metrics,
        dataPort: () => AGENT_PORT,
        placement: (h) => ({ launcher: lab.command(h, []), dataListenHost: '127.0.0.1', temporalAddress: labTemporal.labAddress }),
        hostEnv: (h) => ({ FERRY_DATA_ADVERTISE: `${lab.host(h).address}:${DATA_PORT}` }),
      });
      return new NetCluster(lab, root, temporal, toxiproxies, cluster, cluster.ferryClient(), postgres, forwards);
    } catch (err) {
      for (const p of toxiproxies.values()) await p.stop().catch(() => undefined);
      await temporal?.stop().catch(() => undefined);
      await postgres?.stop().catch(() => undefined);
      await lab.destroy();
      if (!opts.root) await fs.rm(root, { recursive: true, force: true });
      throw err;
    }
  }

  get hosts(): string[] {
    return this.cluster.opts.hosts;
  }

  /** Round-trip time added on every host-to-host data-plane connection (0: none). */
  async setRtt(rttMs: number): Promise<void> {
    for (const p of this.toxiproxies.values()) await p.setRtt('dataplane', rttMs);
  }

  /** Rate of every host's link, both ways (null: unlimited). */
  async setRate(bitsPerSecond: number | null): Promise<void> {
    for (const h of this.hosts) await this.lab.shape(h, { rateBitsPerSecond: bitsPerSecond });
  }

  /** Cut a host off Temporal (its agent's connection and Temporal's answers), the data plane staying up. */
  isolateFromTemporal(host: string): Promise<void> {
    return this.lab.cut(host, TEMPORAL_HOST);
  }

  rejoinTemporal(host: string): Promise<void> {
    return this.lab.restore(host, TEMPORAL_HOST);
  }

  /** Cut the data plane between two hosts, both staying connected to Temporal. */
  cutDataPlane(a: string, b: string): Promise<void> {
    return this.lab.cut(a, b);
  }

  restoreDataPlane(a: string, b: string): Promise<void> {
    return this.lab.restore(a, b);
  }

  /** Stop everything and remove the lab; returns what was left behind (empty, or the test fails). */
  async stop(opts: { keepFiles?: boolean } = {}): Promise<string[]> {
    await this.cluster.stop().catch(() => undefined);
    for (const p of this.toxiproxies.values()) await p.stop().catch(() => undefined);
    for (const f of this.forwards) await f.close().catch(() => undefined);
    await this.temporal.stop().catch(() => undefined);
    await this.postgres?.stop().catch(() => undefined);
    await this.lab.destroy();
    if (!opts.keepFiles) await fs.rm(this.root, { recursive: true, force: true });
    return this.lab.leftovers();
  }
}

async function devServer(lab: NetLab, root: string, clientAddress: string, log?: LogFn): Promise<LabTemporal> {
  const cli = await ensureTemporalCli({ log });
  if (cli.route === 'sdk') throw new Error('no Temporal CLI could be provisioned (npm run setup:temporal says why); the network lab needs it');
  const ip = lab.host(TEMPORAL_HOST).address;
  // All addresses of its namespace: the dev server's own services reach each other on its loopback.
  const options = { cliPath: cli.path, dbFile: path.join(root, 'temporal.db'), port: FRONTEND_PORT, uiPort: null, ip: '0.0.0.0', launcher: lab.command(TEMPORAL_HOST, []), clientAddress };
  let server: DevServer = await startDevServer(options);
  return {
    kind: 'dev',
    address: clientAddress,
    labAddress: `${ip}:${FRONTEND_PORT}`,
    pid: () => server.pid,
    async restart(downMs) {
      process.kill(server.pid, 'SIGKILL');
      await server.exited;
      await new Promise((r) => setTimeout(r, downMs));
      server = await startDevServer(options);
    },
    stop: () => server.stop(),
  };
}

async function productionServer(lab: NetLab, root: string, clientAddress: string, log?: LogFn): Promise<{ temporal: LabTemporal; postgres: PostgresCluster }> {
  const [tool, bin] = await Promise.all([ensureTemporalServer({ log }), ensurePostgres({ log })]);
  const launcher = lab.command(TEMPORAL_HOST, []);
  const ip = lab.host(TEMPORAL_HOST).address;
  const postgres = await PostgresCluster.init({ bin, dir: path.join(root, 'postgres'), host: '127.0.0.1', port: 5432, launcher });
  await postgres.start();
  try {
    const pg = parsePostgresUrl(`${postgres.url}/temporal`);
    await setupSchema(tool, pg, { launcher, log });
    const server: TemporalServer = await startTemporalServer({ tool, dir: path.join(root, 'temporal-server'), pg, ip, ports: defaultPorts(FRONTEND_PORT), launcher, clientAddress, log });
    return {
      postgres,
      temporal: {
        kind: 'postgres',
        address: clientAddress,
        labAddress: `${ip}:${FRONTEND_PORT}`,
        pid: server.pid,
        async restart(downMs) {
          await server.kill();
          await new Promise((r) => setTimeout(r, downMs));
          await server.start();
        },
        stop: () => server.stop(),
      },
    };
  } catch (err) {
    await postgres.stop().catch(() => undefined);
    throw err;
  }
}
