// Throughput of Ferry's NBD client and server, and QMP round trips, against real QEMU peers.
//   npx tsx bench/qemu-protocols.ts [--mib 1024] [--runs 3] [--sizes 262144,1048576,4194304,16777216]
// The image is in the page cache (it was just written), so the numbers are the protocol's and the
// processes', not the disk's. Each figure is the best and the median of --runs runs; the CPU time of
// this process is given beside the client's wall time.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { QmpClient } from '../hypervisor/qemu/qmp/client';
import { NbdClient } from '../nbd/client';
import { FileBackend } from '../nbd/file-backend';
import { NbdServer } from '../nbd/server';

const exec = promisify(execFile);
const MiB = 1 << 20;

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const TOTAL = Number(arg('mib', '1024')) * MiB;
const RUNS = Number(arg('runs', '3'));
const SIZES = arg('sizes', `${256 << 10},${MiB},${4 * MiB},${16 * MiB}`).split(',').map(Number);

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const mbps = (bytes: number, ms: number): number => bytes / 1e6 / (ms / 1000);

async function times(fn: () => Promise<void>): Promise<{ best: number; median: number; cpuMs: number }> {
  const walls: number[] = [];
  let cpu = 0;
  for (let i = 0; i < RUNS; i++) {
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    await fn();
    walls.push(performance.now() - t0);
    const c = process.cpuUsage(c0);
    cpu += (c.user + c.system) / 1000;
  }
  return { best: Math.min(...walls), median: median(walls), cpuMs: cpu / RUNS };
}

function row(label: string, t: { best: number; median: number; cpuMs?: number }, bytes = TOTAL): string {
  const cpu = t.cpuMs === undefined ? '' : `  (Ferry CPU ${(t.cpuMs / 1000).toFixed(2)} s/run)`;
  return `  ${label.padEnd(46)} ${mbps(bytes, t.best).toFixed(0).padStart(5)} MB/s best, ${mbps(bytes, t.median).toFixed(0).padStart(5)} median${cpu}`;
}

async function readAll(sock: string, exportName: string, requestBytes: number, reuseBuffers = true): Promise<void> {
  const c = await NbdClient.connect({ path: sock }, { exportName, maxInFlight: 64 });
  let n = 0;
  for await (const { data } of c.readRanges([{ offset: 0, length: c.size }], { requestBytes, reuseBuffers, windowBytes: Math.max(64 * MiB, 4 * requestBytes) })) n += data.length;
  await c.close();
  if (n !== TOTAL) throw new Error(`read ${n} of ${TOTAL} bytes`);
}

async function waitFor(file: string, proc: ChildProcess): Promise<void> {
  while (!existsSync(file)) {
    if (proc.exitCode !== null) throw new Error(`${proc.spawnfile} exited with ${proc.exitCode}`);
    await sleep(20);
  }
}

async function main(): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-bench-proto-'));
  const procs: ChildProcess[] = [];
  const start = (cmd: string, args: string[]) => {
    const p = spawn(cmd, args, { stdio: 'ignore' });
    procs.push(p);
    return p;
  };
  try {
    const image = path.join(dir, 'disk.raw');
    const chunk = randomBytes(64 * MiB);
    const fh = await fs.open(image, 'w');
    for (let at = 0; at < TOTAL; at += chunk.length) await fh.write(chunk, 0, Math.min(chunk.length, TOTAL - at), at);
    await fh.close();
    console.log(`${TOTAL / MiB} MiB of data, ${RUNS} runs each, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, ${os.cpus().length} cores`);

    console.log('\nNBD client (Ferry) reading the whole image over a Unix socket (readRanges, reuseBuffers unless said)');
    const qnbdSock = path.join(dir, 'qemu-nbd.sock');
    const qnbd = start('qemu-nbd', ['-f', 'raw', '-x', 'disk0', '-k', qnbdSock, '-t', '--shared=4', '-r', image]);
    await waitFor(qnbdSock, qnbd);
    for (const size of SIZES) console.log(row(`from qemu-nbd, ${size / 1024} KiB requests`, await times(() => readAll(qnbdSock, 'disk0', size))));
    console.log(row('from qemu-nbd, 4096 KiB, fresh buffers', await times(() => readAll(qnbdSock, 'disk0', 4 * MiB, false))));
    console.log(row('nbdcopy (libnbd) from qemu-nbd to null:', await times(async () => void (await exec('nbdcopy', [`nbd+unix:///disk0?socket=${qnbdSock}`, 'null:'])))));

    const qmpSock = path.join(dir, 'qmp.sock');
    start('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${qmpSock},server=on,wait=off`, '-blockdev', `driver=file,filename=${image},node-name=f,locking=off`, '-blockdev', 'driver=raw,file=f,node-name=disk0']);
    const qmp = await QmpClient.connect(qmpSock, { timeoutMs: 30_000 });
    const qemuSock = path.join(dir, 'qemu-export.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: qemuSock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'b', 'node-name': 'disk0', name: 'disk0', writable: false });
    for (const size of SIZES) console.log(row(`from QEMU's NBD server, ${size / 1024} KiB requests`, await times(() => readAll(qemuSock, 'disk0', size))));
    console.log(row("nbdcopy (libnbd) from QEMU's server to null:", await times(async () => void (await exec('nbdcopy', [`nbd+unix:///disk0?socket=${qemuSock}`, 'null:'])))));

    console.log('\nQMP round trips (guest-less QEMU, query-status)');
    const lat: number[] = [];
    for (let i = 0; i < 1000; i++) {
      const t0 = performance.now();
      await qmp.execute('query-status');
      lat.push(performance.now() - t0);
    }
    lat.sort((a, b) => a - b);
    const t0 = performance.now();
    await Promise.all(Array.from({ length: 1000 }, () => qmp.execute('query-status')));
    const pipelined = performance.now() - t0;
    console.log(`  sequential: median ${(median(lat) * 1000).toFixed(0)} µs, p99 ${(lat[989] * 1000).toFixed(0)} µs, max ${(lat[999] * 1000).toFixed(0)} µs`);
    console.log(`  pipelined: 1000 commands in ${pipelined.toFixed(0)} ms (${((pipelined / 1000) * 1000).toFixed(0)} µs each)`);
    await qmp.execute('quit').catch(() => undefined);
    await qmp.close();

    console.log('\nNBD server (Ferry, FileBackend) under nbdcopy over a Unix socket');
    const backend = await FileBackend.open(image);
    const ferrySock = path.join(dir, 'ferry.sock');
    const server = await NbdServer.listen({ path: ferrySock }, { exports: { disk0: backend }, onError: (e) => console.error(e.message) });
    const uri = `nbd+unix:///disk0?socket=${ferrySock}`;
    const source = path.join(dir, 'source.raw');
    await fs.copyFile(image, source);
    console.log(row('nbdcopy Ferry to null: (server reads)', await times(async () => void (await exec('nbdcopy', [uri, 'null:'])))));
    console.log(row('nbdcopy file to Ferry (server writes)', await times(async () => void (await exec('nbdcopy', [source, uri])))));
    console.log(row('Ferry client from Ferry server, 4 MiB requests', await times(() => readAll(ferrySock, 'disk0', 4 * MiB))));
    await server.close();
    await backend.close();
  } finally {
    for (const p of procs) if (p.exitCode === null) p.kill('SIGKILL');
    await fs.rm(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
