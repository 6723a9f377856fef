// Real QEMU peers for the QMP and NBD tests: a guest-less qemu-system-x86_64 (-machine none) with
// block nodes and QMP, qemu-nbd, and the command-line NBD tools. Every process and directory a
// test starts is tracked and removed by cleanup(), also after a failure.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { promises as fs, existsSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../../hypervisor/qemu/qmp/client';

export type Tool = 'qemu-system-x86_64' | 'qemu-nbd' | 'qemu-io' | 'qemu-img' | 'nbdinfo' | 'nbdcopy';

const QEMU = 'apt-get install qemu-system-x86 qemu-utils (npm run setup:qemu does it as root)';
const LIBNBD = 'apt-get install libnbd-bin (npm run setup:nbd-tools does it as root)';
const INSTALL: Record<Tool, string> = {
  'qemu-system-x86_64': QEMU,
  'qemu-nbd': QEMU,
  'qemu-io': QEMU,
  'qemu-img': QEMU,
  nbdinfo: LIBNBD,
  nbdcopy: LIBNBD,
};

function onPath(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * `describe`, or `describe.skip` with a loud reason when a tool is missing; under CI a missing tool
 * fails the file instead (the describe runs and its first test says what to install).
 */
export function describeWithTools(title: string, tools: Tool[], body: () => void): void {
  const missing = tools.filter((t) => !onPath(t));
  const inCi = Boolean(process.env.CI) && process.env.CI !== 'false';
  const reason = missing.length ? `missing ${missing.join(', ')}: ${[...new Set(missing.map((t) => INSTALL[t]))].join('; ')}` : null;
  if (reason && !inCi) {
    process.stderr.write(`\n*** SKIPPED: ${title}: ${reason} ***\n\n`);
    describe.skip(title, body);
    return;
  }
  describe(title, () => {
    if (reason) it('has its tools', () => { throw new Error(`${title} must run in CI, but ${reason}`); });
    else body();
  });
}

export class Peers {
  private readonly procs = new Set<ChildProcess>();
  private readonly dirs: string[] = [];
  private readonly clients = new Set<{ close(): Promise<void> }>();

  async tempDir(prefix = 'ferry-qemu-'): Promise<string> {
    // Short paths: a Unix socket path is limited to 107 bytes.
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
    this.dirs.push(dir);
    return dir;
  }

  /** Something to close at cleanup (clients the test may leave open when it fails). */
  track<T extends { close(): Promise<void> }>(c: T): T {
    this.clients.add(c);
    return c;
  }

  /** A sparse raw image of `bytes`. */
  async image(dir: string, name: string, bytes: number): Promise<string> {
    const file = path.join(dir, name);
    await fs.writeFile(file, '');
    await fs.truncate(file, bytes);
    return file;
  }

  spawn(cmd: string, args: string[]): ChildProcess {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-4000)));
    Object.defineProperty(child, 'stderrTail', { get: () => stderr });
    this.procs.add(child);
    child.once('exit', () => this.procs.delete(child));
    return child;
  }

  /**
   * A guest-less QEMU with QMP on `dir/qmp.sock` and the given extra arguments (-blockdev ...),
   * connected. `quit` through QMP, or kill it, to stop it early.
   */
  async qemu(dir: string, args: string[], name = 'qemu'): Promise<{ proc: ChildProcess; qmp: QmpClient; qmpPath: string }> {
    const qmpPath = path.join(dir, `${name}-qmp.sock`);
    const proc = this.spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`, ...args]);
    const exited = new Promise<never>((_, reject) => proc.once('exit', (code) => reject(new Error(`QEMU exited with ${code}: ${stderrOf(proc)}`))));
    exited.catch(() => undefined);
    const qmp = await Promise.race([QmpClient.connect(qmpPath, { timeoutMs: 30_000 }), exited]);
    this.track(qmp);
    return { proc, qmp, qmpPath };
  }

  /** qemu-nbd serving `image` as `exportName` on `socket` (persistent, raw); resolves once it accepts. */
  async qemuNbd(image: string, socket: string, exportName: string, extra: string[] = []): Promise<ChildProcess> {
    const proc = this.spawn('qemu-nbd', ['-f', 'raw', '-x', exportName, '-k', socket, '-t', '--cache=none', ...extra, image]);
    for (const started = Date.now(); !existsSync(socket); ) {
      if (proc.exitCode !== null) throw new Error(`qemu-nbd exited with ${proc.exitCode}: ${stderrOf(proc)}`);
      if (Date.now() - started > 30_000) throw new Error(`qemu-nbd did not create ${socket} within 30 s`);
      await sleep(20);
    }
    return proc;
  }

  async cleanup(): Promise<void> {
    await Promise.allSettled([...this.clients].map((c) => c.close()));
    this.clients.clear();
    await Promise.all([...this.procs].map((p) => stop(p)));
    await Promise.all(this.dirs.splice(0).map((d) => fs.rm(d, { recursive: true, force: true })));
  }
}

export function stderrOf(p: ChildProcess): string {
  return ((p as unknown as { stderrTail?: string }).stderrTail ?? '').trim();
}

/** SIGTERM, then SIGKILL after 5 s; resolves when the process is gone. */
export async function stop(p: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise<void>((res) => p.once('exit', () => res()));
  p.kill(signal);
  const t = setTimeout(() => p.kill('SIGKILL'), 5_000);
  await gone;
  clearTimeout(t);
}

/** Runs a command to completion; rejects with its stderr when it fails. */
export function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('exit', (code, signal) => {
      clearTimeout(t);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} failed (${signal ?? code}): ${err.trim() || out.trim()}`));
    });
  });
}

export const nbdUri = (socket: string, exportName: string): string => `nbd+unix:///${exportName}?socket=${socket}`;
