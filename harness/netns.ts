// Hosts on networks of their own: one Linux network namespace per host, each with a veth pair to a
// bridge that lives in a namespace of its own (the "switch"), and an address per host in one private
// /24 that exists only inside these namespaces: nothing of the lab touches the machine's own network.
// Processes run inside a host with `ip netns exec`. Links can be shaped (tc tbf: rate and queue) and
// cut (blackhole routes between two hosts, or a switch port down), and every namespace, link and
// process is removed at the end; a watchdog removes them if the process that made them dies first.
//
// Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN). Namespace names start with a run-unique prefix
// (`ferry-<6 hex>-`), so concurrent labs never collide and `destroy` never touches another's.
import { execFile, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export const NETNS_PREFIX = 'ferry-';
const SWITCH = 'sw';
const BRIDGE = 'br0';
const HOST_IF = 'eth0';
/** Host addresses start here in the lab's /24 (.1 is left for a gateway nobody uses). */
const FIRST_HOST = 10;

export interface LinkShape {
  /** Egress rate in bits per second (tc tbf), both ways of the host's link; null: unlimited. */
  rateBitsPerSecond: number | null;
  /**
   * Queue of the shaper in bytes: what does not fit is dropped (tail drop), which TCP sees as packet
   * loss under load. Default: 50 ms at the rate.
   */
  queueBytes?: number;
}

export interface NetHost {
  name: string;
  /** Namespace name (`ip netns exec <ns> ...`). */
  ns: string;
  address: string;
  /** The switch port (veth end in the switch namespace) of this host. */
  port: string;
}

export interface Forward {
  /** 127.0.0.1:PORT in this (the caller's) network namespace. */
  address: string;
  close(): Promise<void>;
}

export class NetnsUnavailable extends Error {}

export function run(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 30_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')} failed: ${(stderr || err.message).trim()}`));
      else resolve(stdout);
    });
  });
}

/** Why network namespaces cannot be used here (not root, no `ip`, no permission), or null when they can. */
export async function netnsUnavailable(): Promise<string | null> {
  if (process.platform !== 'linux') return 'network namespaces are a Linux feature';
  if (process.getuid?.() !== 0) return 'network namespaces need root (run the tests as root, as CI does)';
  const probe = `${NETNS_PREFIX}probe-${randomBytes(3).toString('hex')}`;
  try {
    await run('ip', ['netns', 'add', probe]);
    await run('ip', ['netns', 'del', probe]);
    return null;
  } catch (err) {
    await run('ip', ['netns', 'del', probe]).catch(() => undefined);
    return `cannot create a network namespace (${(err as Error).message}); install iproute2 and run as root with CAP_SYS_ADMIN`;
  }
}

/** Names of the namespaces that exist and start with `prefix`. */
export async function namespacesWithPrefix(prefix: string): Promise<string[]> {
  const out = await run('ip', ['netns', 'list']).catch(() => '');
  return out
    .split('\n')
    .map((l) => l.trim().split(/\s+/)[0])
    .filter((n) => n && n.startsWith(prefix));
}

export class NetLab {
  readonly hosts = new Map<string, NetHost>();
  private readonly children = new Set<ChildProcess>();
  private readonly forwards = new Set<Forward>();
  private readonly cuts = new Set<string>();
  private destroyed = false;

  private constructor(
    /** Run-unique prefix of every namespace of this lab, ending in '-'. */
    readonly prefix: string,
    /** The /24, as its first three octets: "10.213.0". */
    readonly subnet: string,
    /** A directory for the lab's sockets. */
    readonly dir: string,
  ) {}

  /** A lab with its switch; add hosts with addHost. */
  static async create(opts: { subnet?: string } = {}): Promise<NetLab> {
    const why = await netnsUnavailable();
    if (why) throw new NetnsUnavailable(why);
    const prefix = `${NETNS_PREFIX}${randomBytes(3).toString('hex')}-`;
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
    const lab = new NetLab(prefix, opts.subnet ?? '10.213.0', dir);
    try {
      const sw = lab.nsName(SWITCH);
      await run('ip', ['netns', 'add', sw]);
      startNetnsWatchdog(prefix);
      await run('ip', ['-n', sw, 'link', 'set', 'lo', 'up']);
      await run('ip', ['-n', sw, 'link', 'add', BRIDGE, 'type', 'bridge']);
      await run('ip', ['-n', sw, 'link', 'set', BRIDGE, 'up']);
    } catch (err) {
      await lab.destroy();
      throw err;
    }
    return lab;
  }

  nsName(host: string): string {
    return `${this.prefix}${host}`;
  }

  host(name: string): NetHost {
    const h = this.hosts.get(name);
    if (!h) throw new Error(`no host ${name} in the network lab (hosts: ${[...this.hosts.keys()].join(', ') || 'none'})`);
    return h;
  }

  /** A namespace for `name`, linked to the switch, with the next address of the /24. */
  async addHost(name: string): Promise<NetHost> {
    if (!/^[a-z0-9][a-z0-9-]{0,30}$/.test(name)) throw new Error(`network host name ${JSON.stringify(name)}: use lowercase letters, digits and dashes`);
    if (this.hosts.has(name)) throw new Error(`host ${name} is already in the network lab`);
    const index = this.hosts.size;
    const ns = this.nsName(name);
    const sw = this.nsName(SWITCH);
    const host: NetHost = { name, ns, address: `${this.subnet}.${FIRST_HOST + index}`, port: `p${index}` };
    await run('ip', ['netns', 'add', ns]);
    this.hosts.set(name, host);
    // Created inside the switch namespace with its peer inside the host's: no link ever exists in the caller's namespace.
    await run('ip', ['-n', sw, 'link', 'add', host.port, 'type', 'veth', 'peer', 'name', HOST_IF, 'netns', ns]);
    await run('ip', ['-n', sw, 'link', 'set', host.port, 'master', BRIDGE, 'up']);
    await run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    await run('ip', ['-n', ns, 'addr', 'add', `${host.address}/24`, 'dev', HOST_IF]);
    await run('ip', ['-n', ns, 'link', 'set', HOST_IF, 'up']);
    return host;
  }

  /** `[cmd, ...args]` to run a program inside a host: for spawn(). */
  command(host: string, argv: string[]): string[] {
    return ['ip', 'netns', 'exec', this.host(host).ns, ...argv];
  }

  /** Start a process inside a host's namespace; destroy() kills it if it still runs. */
  spawn(host: string, argv: string[], opts: SpawnOptions = {}): ChildProcess {
    const [cmd, ...args] = this.command(host, argv);
    const child = spawn(cmd, args, opts);
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    return child;
  }

  /** Run a program inside a host and return its output. */
  exec(host: string, argv: string[], opts: { timeoutMs?: number } = {}): Promise<string> {
    const [cmd, ...args] = this.command(host, argv);
    return run(cmd, args, opts);
  }

  /**
   * Make `target` (an address inside `host`, e.g. its Temporal frontend) reachable from the caller's
   * namespace at 127.0.0.1:PORT. A relay inside the host listens on a unix socket (a path in the file
   * system is reachable from every network namespace); a loopback listener here forwards to it.
   */
  async forward(host: string, target: string): Promise<Forward> {
    const socketPath = path.join(this.dir, `fwd-${host}-${randomBytes(4).toString('hex')}.sock`);
    const relay = this.spawn(host, [process.execPath, '-e', RELAY_SCRIPT, socketPath, target], { stdio: ['ignore', 'ignore', 'pipe'] });
    let relayError = '';
    relay.stderr?.on('data', (c: Buffer) => (relayError += c.toString()));
    for (let i = 0; !(await fs.stat(socketPath).then(() => true, () => false)); i++) {
      if (relay.exitCode !== null || i > 200) {
        relay.kill('SIGKILL');
        throw new Error(`the relay to ${target} inside ${host} did not start: ${relayError.trim() || `exit ${relay.exitCode}`}`);
      }
      await sleep(25);
    }
    const sockets = new Set<net.Socket>();
    const server = net.createServer((client) => {
      const upstream = net.connect(socketPath);
      for (const s of [client, upstream]) {
        sockets.add(s);
        s.on('error', () => undefined);
        s.on('close', () => {
          sockets.delete(s);
          client.destroy();
          upstream.destroy();
        });
      }
      client.pipe(upstream).pipe(client);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const fwd: Forward = {
      address: `127.0.0.1:${(server.address() as net.AddressInfo).port}`,
      close: async () => {
        this.forwards.delete(fwd);
        for (const s of sockets) s.destroy();
        await new Promise<void>((resolve) => server.close(() => resolve()));
        relay.kill('SIGKILL');
        await fs.rm(socketPath, { force: true });
      },
    };
    this.forwards.add(fwd);
    return fwd;
  }

  /** Shape both directions of a host's link to the switch (tbf on each end's egress); null rate removes it. */
  async shape(host: string, shape: LinkShape): Promise<void> {
    const h = this.host(host);
    for (const [ns, dev] of [[h.ns, HOST_IF], [this.nsName(SWITCH), h.port]] as const) {
      if (shape.rateBitsPerSecond === null) {
        await run('tc', ['-n', ns, 'qdisc', 'del', 'dev', dev, 'root']).catch(() => undefined);
        continue;
      }
      const bytesPerSecond = shape.rateBitsPerSecond / 8;
      // The bucket must hold the largest (GSO) packet the veth hands over, 64 KiB, and 8 ms at the rate: with
      // 2 ms the shaper itself held a 1 Gbit/s link to 85 %.
      const burst = Math.max(256 * 1024, Math.round(bytesPerSecond * 0.008));
      const limit = shape.queueBytes ?? Math.max(burst * 2, Math.round(bytesPerSecond * 0.05));
      await run('tc', ['-n', ns, 'qdisc', 'replace', 'dev', dev, 'root', 'tbf', 'rate', `${Math.round(shape.rateBitsPerSecond)}bit`, 'burst', String(burst), 'limit', String(limit)]);
    }
  }

  /** Packets the shapers of a host's link dropped so far (both ends). */
  async drops(host: string): Promise<number> {
    const h = this.host(host);
    let total = 0;
    for (const [ns, dev] of [[h.ns, HOST_IF], [this.nsName(SWITCH), h.port]] as const) {
      const out = await run('tc', ['-s', '-n', ns, 'qdisc', 'show', 'dev', dev]);
      for (const m of out.matchAll(/dropped (\d+)/g)) total += Number(m[1]);
    }
    return total;
  }

  /** Cut the path between two hosts (blackhole routes both ways); every other path stays up. */
  async cut(a: string, b: string): Promise<void> {
    const key = [a, b].sort().join(' ');
    if (this.cuts.has(key)) return;
    for (const [from, to] of [[a, b], [b, a]]) {
      await run('ip', ['-n', this.host(from).ns, 'route', 'add', 'blackhole', `${this.host(to).address}/32`]);
    }
    this.cuts.add(key);
  }

  /** Restore the path cut by cut(a, b). */
  async restore(a: string, b: string): Promise<void> {
    const key = [a, b].sort().join(' ');
    if (!this.cuts.has(key)) return;
    for (const [from, to] of [[a, b], [b, a]]) {
      await run('ip', ['-n', this.host(from).ns, 'route', 'del', 'blackhole', `${this.host(to).address}/32`]).catch(() => undefined);
    }
    this.cuts.delete(key);
  }

  /** Take a host's switch port down (the host is off the network altogether) or up again. */
  async setLink(host: string, up: boolean): Promise<void> {
    await run('ip', ['-n', this.nsName(SWITCH), 'link', 'set', this.host(host).port, up ? 'up' : 'down']);
  }

  /** PIDs of the processes inside a host's namespace. */
  async pids(host: string): Promise<number[]> {
    return parsePids(await run('ip', ['netns', 'pids', this.host(host).ns]).catch(() => ''));
  }

  /**
   * Remove everything: processes started in the lab's namespaces (and their children: every process
   * in them), relays, the namespaces (their veth pairs go with them) and the socket directory.
   */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const f of [...this.forwards]) await f.close().catch(() => undefined);
    for (const c of this.children) c.kill('SIGKILL');
    await removeNamespaces(this.prefix);
    await fs.rm(this.dir, { recursive: true, force: true });
  }

  /** What is left of this lab: namespaces and processes (a test fails on anything here after destroy). */
  async leftovers(): Promise<string[]> {
    const left: string[] = [];
    for (const ns of await namespacesWithPrefix(this.prefix)) {
      const pids = parsePids(await run('ip', ['netns', 'pids', ns]).catch(() => ''));
      left.push(`namespace ${ns}${pids.length ? ` with processes ${pids.join(', ')}` : ''}`);
    }
    return left;
  }
}

function parsePids(out: string): number[] {
  return out
    .split('\n')
    .map((l) => Number(l.trim()))
    .filter((n) => Number.isInteger(n) && n > 0);
}

/** Kill every process in the namespaces with `prefix` and delete them. */
export async function removeNamespaces(prefix: string): Promise<void> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const names = await namespacesWithPrefix(prefix);
    if (names.length === 0) return;
    let alive = 0;
    for (const ns of names) {
      const pids = parsePids(await run('ip', ['netns', 'pids', ns]).catch(() => ''));
      alive += pids.length;
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone already
        }
      }
    }
    // A namespace is deleted only once its processes have died, or they would keep it alive unnamed.
    if (alive === 0) for (const ns of names) await run('ip', ['netns', 'del', ns]).catch(() => undefined);
    else await sleep(100);
  }
  throw new Error(`could not remove the network namespaces ${prefix}*: ${(await namespacesWithPrefix(prefix)).join(', ')}`);
}

// Inside a namespace: listen on a unix socket, forward every connection to HOST:PORT there.
const RELAY_SCRIPT = `
const net = require('node:net');
const [socketPath, target] = process.argv.slice(1);
const i = target.lastIndexOf(':');
const host = target.slice(0, i), port = Number(target.slice(i + 1));
net.createServer((c) => {
  const u = net.connect(port, host);
  for (const s of [c, u]) { s.on('error', () => {}); s.on('close', () => { c.destroy(); u.destroy(); }); }
  c.pipe(u).pipe(c);
}).listen(socketPath);`;

/**
 * If this process dies (kill -9, a test runner's timeout) before destroy(), a detached watchdog
 * removes the lab's namespaces and every process in them.
 */
function startNetnsWatchdog(prefix: string): void {
  const script = `
    const { execFileSync } = require('node:child_process');
    const [parent, prefix] = [Number(process.argv[1]), process.argv[2]];
    const alive = (pid) => { try { process.kill(pid, 0); return true; } catch (e) { return e.code === 'EPERM'; } };
    const names = () => execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }).split('\\n').map((l) => l.trim().split(/\\s+/)[0]).filter((n) => n && n.startsWith(prefix));
    const timer = setInterval(() => {
      let left;
      try { left = names(); } catch { return; }
      if (left.length === 0) process.exit(0);
      if (alive(parent)) return;
      clearInterval(timer);
      for (let i = 0; i < 50 && left.length; i++, left = names()) {
        for (const ns of left) {
          let pids = [];
          try { pids = execFileSync('ip', ['netns', 'pids', ns], { encoding: 'utf8' }).split('\\n').map(Number).filter((n) => n > 0); } catch {}
          for (const pid of pids) { try { process.kill(pid, 'SIGKILL'); } catch {} }
          if (pids.length === 0) { try { execFileSync('ip', ['netns', 'del', ns]); } catch {} }
        }
        execFileSync('sleep', ['0.1']);
      }
      process.exit(0);
    }, 1000);`;
  const watchdog = spawn(process.execPath, ['-e', script, String(process.pid), prefix], { detached: true, stdio: 'ignore' });
  watchdog.on('error', () => undefined);
  watchdog.unref();
}
