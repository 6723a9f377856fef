// Toxiproxy (github.com/Shopify/toxiproxy, built into the cache by scripts/go-tools.ts) inside a host's
// network namespace, driven over its HTTP API: a proxy in front of the host's data plane, and latency
// "toxics" on it. The kernel here has no netem qdisc, so delay is added by this proxy: a latency toxic
// holds every chunk for its delay and keeps up to 1024 chunks in flight, so it delays data without
// capping the throughput of a long fat pipe.
import type { ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { TOXIPROXY, ensureGoTool } from '../scripts/go-tools';
import type { LogFn } from '../scripts/temporal-cli';
import type { Forward, NetLab } from './netns';

const API_PORT = 8474;

export interface ProxySpec {
  name: string;
  /** ADDR:PORT inside the host's namespace. */
  listen: string;
  upstream: string;
}

export class Toxiproxy {
  private constructor(
    private readonly api: Forward,
    private readonly child: ChildProcess,
  ) {}

  /** Start toxiproxy-server inside `host` (API on its loopback, reached through a forward). */
  static async start(lab: NetLab, host: string, opts: { log?: LogFn } = {}): Promise<Toxiproxy> {
    const tool = await ensureGoTool(TOXIPROXY, opts);
    const child = lab.spawn(host, [tool.bin('toxiproxy-server'), '-host', '127.0.0.1', '-port', String(API_PORT)], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr?.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-4000)));
    const api = await lab.forward(host, `127.0.0.1:${API_PORT}`);
    const proxy = new Toxiproxy(api, child);
    for (let i = 0; ; i++) {
      if (child.exitCode !== null) throw new Error(`toxiproxy-server in ${host} exited (${child.exitCode}): ${stderr.trim()}`);
      if (await proxy.call('GET', '/proxies').then(() => true, () => false)) break;
      if (i > 200) {
        await proxy.stop();
        throw new Error(`toxiproxy-server in ${host} did not answer on its API within 10 s: ${stderr.trim()}`);
      }
      await sleep(50);
    }
    return proxy;
  }

  async createProxy(spec: ProxySpec): Promise<void> {
    await this.call('POST', '/proxies', { ...spec, enabled: true });
  }

  /**
   * Add `rttMs` (whole milliseconds, as toxiproxy takes them) of round-trip time to a proxy's
   * connections: half on the way in (upstream), half on the way back (downstream). 0 removes it.
   */
  async setRtt(proxy: string, rttMs: number): Promise<void> {
    if (!Number.isInteger(rttMs) || rttMs < 0) throw new Error(`round-trip time ${rttMs} ms: toxiproxy takes whole milliseconds`);
    const oneWay = { upstream: Math.ceil(rttMs / 2), downstream: Math.floor(rttMs / 2) };
    for (const stream of ['upstream', 'downstream'] as const) {
      const name = `latency-${stream}`;
      await this.call('DELETE', `/proxies/${proxy}/toxics/${name}`).catch((err: Error) => {
        if (!/404/.test(err.message)) throw err;
      });
      if (oneWay[stream] > 0) {
        await this.call('POST', `/proxies/${proxy}/toxics`, { name, type: 'latency', stream, toxicity: 1, attributes: { latency: oneWay[stream], jitter: 0 } });
      }
    }
  }

  async stop(): Promise<void> {
    await this.api.close();
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((r) => this.child.once('exit', r));
      this.child.kill('SIGTERM');
      await exited;
    }
  }

  private async call(method: string, route: string, body?: unknown): Promise<unknown> {
    const res = await fetch(`http://${this.api.address}${route}`, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10_000),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`toxiproxy ${method} ${route}: HTTP ${res.status} ${text.trim()}`);
    return res.headers.get('content-type')?.includes('json') && text ? (JSON.parse(text) as unknown) : text;
  }
}
