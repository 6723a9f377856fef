// QEMU tests: find the assets (as `npm run setup:qemu` left them), skip loudly without them (fail
// when CI is set, as the Web UI test does), and boot Ferry's guest straight from command-line.ts.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { promises as fsp, readFileSync } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { QemuAssets } from '../../scripts/qemu-assets';
import { qemuArgs, type QemuAccel } from '../../hypervisor/qemu/command-line';
import { guestKernelCmdline, type GuestParams } from '../../hypervisor/qemu/guest-params';
import { GuestProbe } from '../../hypervisor/qemu/guest-probe';

const ROOT = path.resolve(__dirname, '..', '..');
const inCi = Boolean(process.env.CI) && process.env.CI !== 'false';

/** The assets findQemuAssets() reports, asked synchronously (jest decides skips while collecting). */
function findAssetsSync(): QemuAssets | { missing: string } {
  const run = spawnSync(process.execPath, [require.resolve('tsx/cli'), path.join(ROOT, 'scripts', 'setup-qemu.ts'), '--find'], { encoding: 'utf8', timeout: 300_000 });
  const last = run.stdout?.trim().split('\n').pop() ?? '';
  try {
    return JSON.parse(last) as QemuAssets | { missing: string };
  } catch {
    return { missing: `scripts/setup-qemu.ts --find failed (exit ${run.status}): ${(run.stderr ?? '').trim().slice(-1000)}` };
  }
}

let vmCounter = 0;
const vmTag = `${process.pid.toString(36)}${Math.random().toString(36).slice(2, 6)}`;
/** A QEMU VM of a test (the guest boots Linux and runs Ferry's guest program), 64 MiB disk, 128 MiB memory. */
export function testQemuVm(over: Partial<{ diskBytes: number; memoryBytes: number; opsPerSecond: number; workload: 'randwrite' | 'idle' | 'mixed' }> = {}) {
  vmCounter++;
  return {
    vmId: `qvm-${vmTag}-${vmCounter}`,
    diskBytes: 64 * 1024 * 1024,
    memoryBytes: 128 * 1024 * 1024,
    workload: 'randwrite' as 'randwrite' | 'idle' | 'mixed',
    seed: 40 + vmCounter,
    opsPerSecond: 200,
    fill: true,
    ...over,
  };
}

/** A describe() that runs when QEMU and the guest are there, and otherwise skips with the reason (fails under CI). */
export function describeQemu(name: string, body: (assets: () => QemuAssets) => void): void {
  const found = findAssetsSync();
  const missing = 'missing' in found ? found.missing : null;
  if (missing && !inCi) process.stderr.write(`\n*** SKIPPED: the QEMU tests cannot run: ${missing} (npm run setup:qemu provisions QEMU and the guest) ***\n\n`);
  (missing && !inCi ? describe.skip : describe)(name, () => {
    beforeAll(() => {
      if (missing) throw new Error(`the QEMU tests must run in CI, but ${missing}`);
    });
    body(() => found as QemuAssets);
  });
}

export interface TestGuest {
  dir: string;
  image: string;
  consoleLog: string;
  qmpSocket: string;
  probe: GuestProbe;
  ready: Record<string, string>;
  child: ChildProcess;
  /** The console so far (for failure messages). */
  console(): string;
  /** kill -9 of QEMU, then waits for it to be gone. */
  kill9(): Promise<void>;
  /** Stops QEMU (if running) and closes the probe; the directory stays (removeDir). */
  stop(): Promise<void>;
}

export interface BootOptions {
  assets: QemuAssets;
  accel: QemuAccel;
  params: GuestParams;
  /** The disk image (it must exist); its directory also holds the sockets and the console log. */
  image: string;
  memoryBytes?: number;
}

let bootCount = 0;

export async function bootGuest(o: BootOptions): Promise<TestGuest> {
  const dir = path.dirname(o.image);
  const tag = `${process.pid}-${++bootCount}`;
  const files = {
    consoleLog: path.join(dir, `console-${tag}.log`),
    qmpSocket: path.join(dir, `qmp-${tag}.sock`),
    probeSocket: path.join(dir, `probe-${tag}.sock`),
    pidFile: path.join(dir, `qemu-${tag}.pid`),
  };
  const args = qemuArgs({
    vmId: `test-${tag}`,
    memoryBytes: o.memoryBytes ?? 128 * 1024 * 1024,
    vcpus: 1,
    accel: o.accel,
    kernel: o.assets.kernel,
    initrd: o.assets.initrd,
    append: guestKernelCmdline(o.params),
    ...files,
    disk: { kind: 'file', path: o.image },
  });
  const child = spawn(o.assets.qemuSystem, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    child.once('exit', () => resolve());
    child.once('error', () => resolve());
  });
  const readConsole = (): string => {
    try {
      return readFileSync(files.consoleLog, 'latin1');
    } catch {
      return '';
    }
  };
  const kill9 = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  let probe: GuestProbe | null = null;
  try {
    probe = await GuestProbe.connect(files.probeSocket);
    const ready = await probe.waitReady({ timeoutMs: 120_000 });
    const connected = probe;
    return {
      dir,
      image: o.image,
      consoleLog: files.consoleLog,
      qmpSocket: files.qmpSocket,
      probe: connected,
      ready,
      child,
      console: readConsole,
      kill9,
      stop: async () => {
        connected.close();
        await kill9();
      },
    };
  } catch (err) {
    probe?.close();
    await kill9();
    throw new Error(`${err instanceof Error ? err.message : String(err)}\n--- QEMU stderr ---\n${stderr}\n--- console ---\n${readConsole().slice(-3000)}`);
  }
}

export async function makeTempDir(prefix: string): Promise<string> {
  return fsp.mkdtemp(path.join(os.tmpdir(), prefix));
}

/** One QMP command over a fresh connection: greeting, qmp_capabilities, the command, its return. */
export async function qmp(socketPath: string, execute: string, args?: Record<string, unknown>): Promise<unknown> {
  const socket = net.connect(socketPath);
  socket.setEncoding('utf8');
  let buffered = '';
  const lines: unknown[] = [];
  let wake: (() => void) | null = null;
  socket.on('data', (chunk: string) => {
    buffered += chunk;
    let nl: number;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line) lines.push(JSON.parse(line));
    }
    wake?.();
  });
  const failed = new Promise<never>((_, reject) => socket.once('error', reject));
  const next = async (): Promise<Record<string, unknown>> => {
    for (;;) {
      const msg = lines.shift() as Record<string, unknown> | undefined;
      if (msg && !('event' in msg)) return msg;
      if (!msg) await Promise.race([new Promise<void>((resolve) => (wake = resolve)), failed]);
    }
  };
  try {
    await next(); // greeting
    socket.write(`${JSON.stringify({ execute: 'qmp_capabilities' })}\n`);
    await next();
    socket.write(`${JSON.stringify(args ? { execute, arguments: args } : { execute })}\n`);
    const reply = await next();
    if ('error' in reply) throw new Error(`QMP ${execute} failed: ${JSON.stringify(reply.error)}`);
    return reply.return;
  } finally {
    socket.destroy();
  }
}
