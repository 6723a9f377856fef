// Bench scenario `network`: does the data plane's window fill a long link? Two hosts in network
// namespaces (harness/netns.ts), both links shaped to 1 Gbit/s (tc tbf), a Toxiproxy in front of the
// receiver adding the round-trip time; the sender moves a disk's worth of 4 MiB messages with the
// window migrations use, and the rate is compared with the link's (target: ≥ 90 % at 1 and 20 ms).
import path from 'node:path';
import { createInterface } from 'node:readline';
import { NetLab } from '../harness/netns';
import { Toxiproxy } from '../harness/toxiproxy';
import { nodeEntryArgs } from '../common/node-entry';

const PEER = path.join(__dirname, 'net-peer');
const PROXY_PORT = 7400;
const SERVER_PORT = 7500;

export interface NetworkRun {
  rttMs: number;
  linkBitsPerSecond: number;
  mib: number;
  seconds: number;
  bytesPerSecond: number;
  /** Share of the link's rate the data plane reached. */
  linkShare: number;
  /** Packets the shapers dropped meanwhile (TCP losses under load). */
  drops: number;
}

export interface NetworkOptions {
  rttsMs?: number[];
  linkBitsPerSecond?: number;
  mib?: number;
  reps?: number;
  log?: (line: string) => void;
}

export async function measureNetwork(o: NetworkOptions = {}): Promise<NetworkRun[]> {
  const rtts = o.rttsMs ?? [1, 20];
  const rate = o.linkBitsPerSecond ?? 1e9;
  const mib = o.mib ?? 512;
  const lab = await NetLab.create();
  const runs: NetworkRun[] = [];
  try {
    await lab.addHost('src');
    const dst = await lab.addHost('dst');
    for (const h of ['src', 'dst']) await lab.shape(h, { rateBitsPerSecond: rate });
    const proxy = await Toxiproxy.start(lab, 'dst', { log: o.log });
    await proxy.createProxy({ name: 'dataplane', listen: `${dst.address}:${PROXY_PORT}`, upstream: `127.0.0.1:${SERVER_PORT}` });
    const server = lab.spawn('dst', [process.execPath, ...nodeEntryArgs(PEER), 'serve', String(SERVER_PORT)], { stdio: ['ignore', 'pipe', 'inherit'] });
    await firstLine(server.stdout!);
    for (const rttMs of rtts) {
      await proxy.setRtt('dataplane', rttMs);
      for (let rep = 0; rep < (o.reps ?? 1); rep++) {
        const dropsBefore = (await lab.drops('src')) + (await lab.drops('dst'));
        const out = await lab.exec('src', [process.execPath, ...nodeEntryArgs(PEER), 'send', `${dst.address}:${PROXY_PORT}`, String(mib)], { timeoutMs: 600_000 });
        const { ms, bytes } = JSON.parse(out.trim().split('\n').at(-1)!) as { ms: number; bytes: number };
        const bytesPerSecond = bytes / (ms / 1000);
        const run: NetworkRun = {
          rttMs,
          linkBitsPerSecond: rate,
          mib,
          seconds: Math.round(ms) / 1000,
          bytesPerSecond: Math.round(bytesPerSecond),
          linkShare: Math.round((bytesPerSecond / (rate / 8)) * 1000) / 1000,
          drops: (await lab.drops('src')) + (await lab.drops('dst')) - dropsBefore,
        };
        o.log?.(`network: ${rttMs} ms RTT at ${rate / 1e9} Gbit/s: ${(bytesPerSecond / 1e6).toFixed(1)} MB/s, ${(run.linkShare * 100).toFixed(1)}% of the link`);
        runs.push(run);
      }
    }
    await proxy.stop();
  } finally {
    await lab.destroy();
  }
  return runs;
}

function firstLine(stream: NodeJS.ReadableStream): Promise<string> {
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: stream });
    rl.once('line', (line) => {
      resolve(line);
      rl.close();
    });
    rl.once('close', () => reject(new Error('the data-plane peer exited before it was ready')));
  });
}

export function formatNetwork(runs: NetworkRun[]): string {
  const lines = ['Network (data plane between namespaces, 1 Gbit/s links, RTT from Toxiproxy)'];
  for (const r of runs) {
    lines.push(`  ${String(r.rttMs).padStart(3)} ms RTT: ${(r.bytesPerSecond / 1e6).toFixed(1)} MB/s = ${(r.linkShare * 100).toFixed(1)}% of ${r.linkBitsPerSecond / 1e9} Gbit/s (${r.mib} MiB in ${r.seconds.toFixed(2)} s, ${r.drops} packets dropped by the shapers)`);
  }
  return lines.join('\n');
}
