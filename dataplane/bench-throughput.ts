// Loopback throughput of the data plane against a raw TCP copy of the same bytes.
//   npx tsx dataplane/bench-throughput.ts --mb 1024 --block 65536 [--runs 3] [--window 8388608] [--tls]
// The receiving side runs in a child process (as it would on another host): a raw TCP sink that
// counts bytes, and a data-plane server whose handler only counts (no disk I/O in either path).
// Raw and data-plane runs alternate; the best and median wall times are reported, and the CPU time
// of each side (steadier than wall time on a busy machine).
import { execFileSync, fork, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { connect, listen, type TlsOptions } from './index';

const SECRET = Buffer.from('ferry-bench-secret-not-for-production');
const IDENTITY = { migrationId: 'bench', epoch: 1, vmId: 'bench-vm', stream: 'disk' };

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

type ToParent = { ports: { raw: number; dp: number } } | { rawDone: number } | { cpuMs: number };

async function serve(tlsOpts: TlsOptions | undefined): Promise<void> {
  const send = (m: ToParent): void => void process.send?.(m);
  const raw = net.createServer((socket) => {
    let n = 0;
    socket.on('data', (c: Buffer) => (n += c.length));
    socket.on('end', () => {
      send({ rawDone: n });
      socket.end();
    });
  });
  await new Promise<void>((resolve) => raw.listen(0, '127.0.0.1', resolve));
  const dp = await listen({ host: '127.0.0.1', port: 0, secret: SECRET, tls: tlsOpts, accept: async () => ({ onMessage: async () => undefined }) });
  send({ ports: { raw: (raw.address() as net.AddressInfo).port, dp: dp.port } });
  process.on('message', () => {
    const u = process.cpuUsage();
    send({ cpuMs: (u.user + u.system) / 1000 });
  });
  process.on('disconnect', () => process.exit(0));
}

function nextMessage<T>(child: ChildProcess, pick: (m: ToParent) => T | undefined): Promise<T> {
  return new Promise((resolve) => {
    const on = (m: ToParent): void => {
      const v = pick(m);
      if (v !== undefined) {
        child.off('message', on);
        resolve(v);
      }
    };
    child.on('message', on);
  });
}

async function rawCopy(port: number, pool: Buffer, total: number, block: number, child: ChildProcess): Promise<number> {
  const socket = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.setNoDelay(true);
  const done = nextMessage(child, (m) => ('rawDone' in m ? m.rawDone : undefined));
  const t0 = performance.now();
  for (let sent = 0; sent < total; sent += block) {
    const off = sent % pool.length;
    if (!socket.write(pool.subarray(off, off + block))) await new Promise((resolve) => socket.once('drain', resolve));
  }
  socket.end();
  const received = await done;
  const ms = performance.now() - t0;
  if (received !== total) throw new Error(`raw sink received ${received} of ${total} bytes`);
  socket.destroy();
  return ms;
}

async function dataPlaneCopy(port: number, pool: Buffer, total: number, block: number, windowBytes: number, tlsOpts: TlsOptions | undefined): Promise<number> {
  const session = await connect({ address: `127.0.0.1:${port}`, secret: SECRET, identity: IDENTITY, windowBytes, tls: tlsOpts });
  const t0 = performance.now();
  for (let sent = 0; sent < total; sent += block) {
    const off = sent % pool.length;
    await session.send({ type: 1, meta: { offset: sent }, data: pool.subarray(off, off + block) });
  }
  await session.flush();
  const ms = performance.now() - t0;
  if (session.stats.bytesAcked !== total) throw new Error(`acknowledged ${session.stats.bytesAcked} of ${total} bytes`);
  await session.close();
  return ms;
}

/** Writes a self-signed certificate for localhost into a new directory. */
function selfSigned(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-bench-tls-'));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-days', '1',
    '-addext', 'subjectAltName=DNS:localhost', '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem')], { stdio: 'ignore' });
  return dir;
}

function tlsFrom(dir: string, side: 'server' | 'client'): TlsOptions {
  const cert = fs.readFileSync(path.join(dir, 'cert.pem'));
  return side === 'server' ? { cert, key: fs.readFileSync(path.join(dir, 'key.pem')) } : { ca: cert, servername: 'localhost' };
}

async function main(): Promise<void> {
  const mb = arg('mb', 1024);
  const block = arg('block', 65536);
  const windowBytes = arg('window', 8 * 1024 * 1024);
  const useTls = process.argv.includes('--tls');
  const total = Math.floor((mb * 1024 * 1024) / block) * block;
  const tlsDir = useTls ? selfSigned() : undefined;
  const clientTls = tlsDir ? tlsFrom(tlsDir, 'client') : undefined;

  const child = fork(__filename, ['--serve', ...(tlsDir ? ['--tls-dir', tlsDir] : [])]);
  try {
    const ports = await nextMessage(child, (m) => ('ports' in m ? m.ports : undefined));
    // Random data (not zeros, so no block is skipped), cycled from a pool to keep memory small.
    const pool = randomBytes(Math.min(total, 64 * 1024 * 1024) - (Math.min(total, 64 * 1024 * 1024) % block) || block);
    const mib = total / (1024 * 1024);
    const runs = arg('runs', 3);
    console.log(`loopback, ${mib} MiB in blocks of ${block} bytes, window ${windowBytes} bytes${useTls ? ', data plane over TLS' : ''}, ${runs} runs each, ${os.cpus().length} CPUs, node ${process.version}`);
    await dataPlaneCopy(ports.dp, pool, Math.min(total, 64 * 1024 * 1024), block, windowBytes, clientTls); // warm-up
    const childCpu = async (): Promise<number> => {
      const reply = nextMessage(child, (m) => ('cpuMs' in m ? m.cpuMs : undefined));
      child.send('cpu');
      return reply;
    };
    const measure = async (run: () => Promise<number>): Promise<{ ms: number; senderCpu: number; receiverCpu: number }> => {
      const c0 = process.cpuUsage();
      const r0 = await childCpu();
      const ms = await run();
      const c1 = process.cpuUsage(c0);
      return { ms, senderCpu: (c1.user + c1.system) / 1000, receiverCpu: (await childCpu()) - r0 };
    };
    const results = { raw: [] as Awaited<ReturnType<typeof measure>>[], dp: [] as Awaited<ReturnType<typeof measure>>[] };
    for (let i = 0; i < runs; i++) {
      results.raw.push(await measure(() => rawCopy(ports.raw, pool, total, block, child)));
      results.dp.push(await measure(() => dataPlaneCopy(ports.dp, pool, total, block, windowBytes, clientTls)));
    }
    const rate = (ms: number): number => mib / (ms / 1000);
    const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    const summary = {} as Record<'raw' | 'dp', { best: number; median: number }>;
    for (const [key, label] of [['raw', 'raw TCP   '], ['dp', 'data plane']] as const) {
      const r = results[key];
      const best = Math.min(...r.map((x) => x.ms));
      const med = median(r.map((x) => x.ms));
      summary[key] = { best, median: med };
      const perGiB = (cpuMs: number): string => ((cpuMs / 1000) * (1024 / mib)).toFixed(2);
      console.log(
        `${label}: best ${rate(best).toFixed(0).padStart(5)} MiB/s, median ${rate(med).toFixed(0).padStart(5)} MiB/s;` +
          ` CPU per GiB: sender ${perGiB(median(r.map((x) => x.senderCpu)))} s, receiver ${perGiB(median(r.map((x) => x.receiverCpu)))} s`,
      );
    }
    console.log(`data plane / raw TCP: ${((summary.raw.best / summary.dp.best) * 100).toFixed(0)}% (best), ${((summary.raw.median / summary.dp.median) * 100).toFixed(0)}% (median)`);
  } finally {
    child.disconnect();
    if (tlsDir) fs.rmSync(tlsDir, { recursive: true, force: true });
  }
}

if (process.argv.includes('--serve')) {
  const i = process.argv.indexOf('--tls-dir');
  void serve(i >= 0 ? tlsFrom(process.argv[i + 1], 'server') : undefined);
} else {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
