// The world a chaos run works in: a Temporal dev server with SQLite persistence (so it can be killed
// and restarted), a LocalCluster of real agents whose data planes are reached through proxies, and the
// directory of armed fault points (common/fault-points.ts). With `net: 'netns'` every host and the
// Temporal server have a network namespace of their own (harness/net-cluster.ts) instead, and the
// network faults cut real links and routes.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { ensureTemporalCli, freePort, startDevServer, type DevServer } from '../scripts/temporal-cli';
import { LocalCluster } from '../harness/cluster';
import { FerryClient } from '../client/ferry-client';
import { DataPlaneProxy } from './proxy';
import { NetCluster } from '../harness/net-cluster';
import type { DriverKind } from '../hypervisor';
import type { VmSpec } from '../hypervisor/driver';

export type NetMode = 'loopback' | 'netns';

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
  /** Loopback mode: the TCP proxy in front of each host's data plane. */
  proxies: Map<string, DataPlaneProxy>;
  /** netns mode: the hosts' namespaces, links and Toxiproxies. */
  net: NetCluster | null;
  faultDir: string;
  hosts: [string, string];
  /** The hypervisor of every agent (FERRY_HYPERVISOR). */
  hypervisor: DriverKind;
}

/** The size of a cell's (and the soak's) VM on each hypervisor: a QEMU guest boots a Linux kernel, so it needs memory for it. */
export const CHAOS_VM: Record<DriverKind, Pick<VmSpec, 'diskBytes' | 'memoryBytes'>> = {
  sim: { diskBytes: 16 * 1024 * 1024, memoryBytes: 8 * 1024 * 1024 },
  qemu: { diskBytes: 16 * 1024 * 1024, memoryBytes: 128 * 1024 * 1024 },
};

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

export async function startChaosEnv(
  opts: { temporal?: TemporalControl; hosts?: [string, string]; root?: string; net?: NetMode; hypervisor?: DriverKind } = {},
): Promise<ChaosEnv> {
  const root = opts.root ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-chaos-')));
  const faultDir = path.join(root, 'fault-points');
  await fs.mkdir(faultDir, { recursive: true });
  const hypervisor = opts.hypervisor ?? 'sim';
  const agentEnv = { FERRY_FAULT_POINTS_DIR: faultDir, FERRY_HYPERVISOR: hypervisor };
  if (opts.net === 'netns') return startNetnsEnv(root, faultDir, opts.hosts ?? ['a', 'b'], agentEnv, hypervisor);
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
      env: agentEnv,
      hostEnv: (h) => ({ FERRY_DATA_ADVERTISE: proxies.get(h)!.address }),
    });
  } catch (err) {
    for (const p of proxies.values()) await p.close();
    if (!opts.temporal) await temporal.stop();
    throw err;
  }
  return { root, cluster, ferry: cluster.ferryClient(), temporal, proxies, net: null, faultDir, hosts, hypervisor };
}

async function startNetnsEnv(root: string, faultDir: string, hosts: [string, string], env: Record<string, string>, hypervisor: DriverKind): Promise<ChaosEnv> {
  const net = await NetCluster.start({ hosts, root: path.join(root, 'net'), env });
  const temporal: TemporalControl = {
    address: net.temporal.address,
    pid: () => net.temporal.pid(),
    restart: (downMs) => net.temporal.restart(downMs),
    stop: async () => undefined, // stopped with the lab
  };
  return { root, cluster: net.cluster, ferry: net.ferry, temporal, proxies: new Map(), net, faultDir, hosts, hypervisor };
}

/** Stops everything; in netns mode, returns what the lab left behind (namespaces, processes): a failure when not empty. */
export async function stopChaosEnv(env: ChaosEnv, opts: { keepTemporal?: boolean; keepFiles?: boolean } = {}): Promise<string[]> {
  if (env.net) {
    const left = await env.net.stop({ keepFiles: opts.keepFiles });
    if (!opts.keepFiles) await fs.rm(env.root, { recursive: true, force: true });
    return left;
  }
  await env.cluster.stop();
  for (const p of env.proxies.values()) await p.close();
  if (!opts.keepTemporal) await env.temporal.stop();
  if (!opts.keepFiles) await fs.rm(env.root, { recursive: true, force: true });
  return [];
}
