// Limits of this machine, measured in the same run as the migrations:
//   - `cp` of a freshly written disk-sized file followed by an fsync of the copy, and `cp` of a
//     memory-sized file (their sum is the physical limit). A migration makes the disk durable on the
//     destination (Sync after the first pass) and keeps memory in RAM, so the limit does the same.
//     Page caches are left alone, as they are for the migrations (whose images are also freshly written);
//   - a raw TCP loopback copy of the disk-sized file in 64 KiB chunks to a file written by another
//     process (the most the data plane could do);
//   - a cold migration (stop, copy disk and memory, start), approximated as the two `cp` times: the
//     guest is down for all of it.
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { nodeEntryArgs } from '../common/node-entry';
import { median } from './stats';

const run = promisify(execFile);
const CHUNK = 64 * 1024;

export interface Baselines {
  diskBytes: number;
  memoryBytes: number;
  /** cp of the disk image and fsync of the copy. */
  cpDiskMs: number;
  /** The same cp without the fsync (the copy may still sit in the page cache). */
  cpDiskCachedMs: number;
  cpMemoryMs: number;
  /** durable cp of disk + cp of memory: the least time any migration of this VM can take here. */
  physicalLimitMs: number;
  tcpDiskMs: number;
  /** Cold migration: the guest is stopped for the whole copy. */
  coldMs: number;
  samples: { cpDiskMs: number[]; cpDiskCachedMs: number[]; cpMemoryMs: number[]; tcpDiskMs: number[] };
}

/** Writes `bytes` of random data (a 16 MiB pool, repeated) and makes it durable, so cp starts from a settled file. */
export async function writeFresh(file: string, bytes: number): Promise<void> {
  const pool = randomBytes(Math.min(bytes, 16 << 20));
  const h = await fs.open(file, 'w');
  try {
    for (let off = 0; off < bytes; off += pool.length) await h.write(pool, 0, Math.min(pool.length, bytes - off), off);
    await h.sync();
  } finally {
    await h.close();
  }
}

async function timeCp(from: string, to: string, durable = false): Promise<number> {
  const t0 = performance.now();
  await run('cp', [from, to]);
  if (durable) {
    const h = await fs.open(to, 'r+');
    await h.datasync().finally(() => h.close());
  }
  const ms = performance.now() - t0;
  await fs.rm(to, { force: true });
  return ms;
}

/** Copies `from` to `to` over a loopback TCP connection to another process (tcp-sink); the wall time in ms. */
export async function timeTcp(from: string, to: string): Promise<number> {
  const child = spawn(process.execPath, [...nodeEntryArgs(path.join(__dirname, 'tcp-sink')), to], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines: Record<string, number>[] = [];
  const waiters: (() => void)[] = [];
  let buf = '';
  child.stdout.on('data', (c: Buffer) => {
    buf += c.toString();
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      lines.push(JSON.parse(buf.slice(0, nl)) as Record<string, number>);
      buf = buf.slice(nl + 1);
      waiters.shift()?.();
    }
  });
  const next = async (): Promise<Record<string, number>> => {
    if (lines.length === 0) {
      await new Promise<void>((resolve, reject) => {
        waiters.push(resolve);
        child.once('exit', (code) => reject(new Error(`tcp-sink exited with ${code}`)));
      });
    }
    return lines.shift()!;
  };
  try {
    const { port } = await next();
    const t0 = performance.now();
    const socket = net.connect(port, '127.0.0.1');
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    createReadStream(from, { highWaterMark: CHUNK }).pipe(socket);
    const { bytes } = await next();
    const ms = performance.now() - t0;
    const size = (await fs.stat(from)).size;
    if (bytes !== size) throw new Error(`raw TCP copy received ${bytes} of ${size} bytes`);
    return ms;
  } finally {
    child.kill();
    await fs.rm(to, { force: true });
  }
}

export async function measureBaselines(dir: string, diskBytes: number, memoryBytes: number, reps: number): Promise<Baselines> {
  const disk = path.join(dir, 'baseline-disk.img');
  const mem = path.join(dir, 'baseline-memory.img');
  const samples = { cpDiskMs: [] as number[], cpDiskCachedMs: [] as number[], cpMemoryMs: [] as number[], tcpDiskMs: [] as number[] };
  try {
    await writeFresh(disk, diskBytes);
    await writeFresh(mem, memoryBytes);
    for (let i = 0; i < reps; i++) {
      samples.cpDiskMs.push(await timeCp(disk, `${disk}.copy`, true));
      samples.cpDiskCachedMs.push(await timeCp(disk, `${disk}.copy`));
      samples.cpMemoryMs.push(await timeCp(mem, `${mem}.copy`));
      samples.tcpDiskMs.push(await timeTcp(disk, `${disk}.tcp`));
    }
  } finally {
    await fs.rm(disk, { force: true });
    await fs.rm(mem, { force: true });
  }
  const cpDiskMs = median(samples.cpDiskMs);
  const cpMemoryMs = median(samples.cpMemoryMs);
  return {
    diskBytes,
    memoryBytes,
    cpDiskMs,
    cpDiskCachedMs: median(samples.cpDiskCachedMs),
    cpMemoryMs,
    physicalLimitMs: cpDiskMs + cpMemoryMs,
    tcpDiskMs: median(samples.tcpDiskMs),
    coldMs: cpDiskMs + cpMemoryMs,
    samples,
  };
}
