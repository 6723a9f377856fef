// The world a chaos run works in: a Temporal dev server with SQLite persistence (so it can be killed
// and restarted), a LocalCluster of real agents whose data planes are reached through proxies, and the
// directory of armed fault points (common/fault-points.ts).
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { ensureTemporalCli, freePort, startDevServer, type DevServer } from '../scripts/temporal-cli';
import { LocalCluster } from '../harness/cluster';
import { FerryClient } from '../client/ferry-client';
import { DataPlaneProxy } from './proxy';

export interface TemporalControl {
  address: string;
  /** The server process, when it is ours (it lives under the run's directory). */
  pid: () => number | null;
  /** kill -9 and start again on the same SQLite file and port; null when the server is shared (cannot restart). */
  restart: ((downMs: number) => Promise<void>) | null;
  stop(): Promise<void>;
}

export interface ChaosEnv {
  root: string;
  cluster: LocalCluster;
  ferry: FerryClient;
  temporal: TemporalControl;
  proxies: Map<string, DataPlaneProxy>;
  faultDir: string;
  hosts: [string, string];
}

/** A dev server of our own, persisted in `dir`/temporal.db, that the harness can kill and restart. */
export async function ownTemporal(dir: string): Promise<TemporalControl> {
  const cli = await ensureTemporalCli();
  const dbFile = path.join(dir, 'temporal.db');
  const port = await freePort();
  let server: DevServer = await startDevServer({ cliPath: cli.path, dbFile, port, uiPort: null });
  return {
    address: server.address,
    pid: () => server.pid,
    async restart(downMs) {
      process.kill(server.pid, 'SIGKILL');
      await server.exited;
      await new Promise((r) => setTimeout(r, downMs));
      server = await startDevServer({ cliPath: cli.path, dbFile, port, uiPort: null });
    },
    stop: () => server.stop(),
  };
}

export function sharedTemporal(address: string): TemporalControl {
  return { address, pid: () => null, restart: null, stop: async () => undefined };
}

export async function startChaosEnv(opts: { temporal?: TemporalControl; hosts?: [string, string]; root?: string } = {}): Promise<ChaosEnv> {
  const root = opts.root ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-chaos-')));
  const faultDir = path.join(root, 'fault-points');
  await fs.mkdir(faultDir, { recursive: true });
  const temporal = opts.temporal ?? (await ownTemporal(root));
  const hosts = opts.hosts ?? ['a', 'b'];
  const proxies = new Map<string, DataPlaneProxy>();
  let cluster: LocalCluster | null = null;
  try {
    for (const h of hosts) proxies.set(h, await DataPlaneProxy.start(() => cluster?.agents.get(h)?.dataPort ?? null));
    cluster = await LocalCluster.start({
      temporalAddress: temporal.address,
      hosts,
      root,
      env: { FERRY_FAULT_POINTS_DIR: faultDir },
      hostEnv: (h) => ({ FERRY_DATA_ADVERTISE: proxies.get(h)!.address }),
    });
  } catch (err) {
    for (const p of proxies.values()) await p.close();
    if (!opts.temporal) await temporal.stop();
    throw err;
  }
  return { root, cluster, ferry: new FerryClient(cluster.client), temporal, proxies, faultDir, hosts };
}

export async function stopChaosEnv(env: ChaosEnv, opts: { keepTemporal?: boolean; keepFiles?: boolean } = {}): Promise<void> {
  await env.cluster.stop();
  for (const p of env.proxies.values()) await p.close();
  if (!opts.keepTemporal) await env.temporal.stop();
  if (!opts.keepFiles) await fs.rm(env.root, { recursive: true, force: true });
}
