// KVM or TCG: KVM only when /dev/kvm really runs a guest. On some machines /dev/kvm opens but a
// KVM guest hangs, so a short KVM boot of Ferry's guest must reach its ready line within a few
// seconds; otherwise TCG. Memoized per process (once per agent start).
import { spawn } from 'node:child_process';
import { constants as fsConstants, promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { qemuArgs, type QemuAccel } from './command-line';
import { guestKernelCmdline } from './guest-params';

export interface AccelChoice {
  accel: QemuAccel;
  reason: string;
}

export interface AccelProbeAssets {
  qemuSystem: string;
  kernel: string;
  initrd: string;
}

const KVM_DEVICE = '/dev/kvm';
let memo: Promise<AccelChoice> | null = null;

export function probeAccel(assets: AccelProbeAssets, opts: { timeoutMs?: number } = {}): Promise<AccelChoice> {
  memo ??= probeOnce(assets, opts.timeoutMs ?? 5000);
  return memo;
}

async function probeOnce(assets: AccelProbeAssets, timeoutMs: number): Promise<AccelChoice> {
  try {
    await fsp.access(KVM_DEVICE, fsConstants.R_OK | fsConstants.W_OK);
  } catch (err) {
    return { accel: 'tcg', reason: `${KVM_DEVICE} is not usable (${(err as NodeJS.ErrnoException).code ?? String(err)})` };
  }
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'ferry-kvm-probe-'));
  try {
    const image = path.join(dir, 'disk.img');
    await fsp.writeFile(image, Buffer.alloc(64 * 1024));
    const consoleLog = path.join(dir, 'console.log');
    const args = qemuArgs({
      vmId: 'ferry-kvm-probe',
      memoryBytes: 64 * 1024 * 1024,
      vcpus: 1,
      accel: 'kvm',
      kernel: assets.kernel,
      initrd: assets.initrd,
      append: guestKernelCmdline({ seed: 0, workload: 'idle' }),
      qmpSocket: path.join(dir, 'qmp.sock'),
      consoleLog,
      probeSocket: path.join(dir, 'probe.sock'),
      pidFile: path.join(dir, 'qemu.pid'),
      disk: { kind: 'file', path: image },
    });
    const child = spawn(assets.qemuSystem, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
    let exited = false;
    const gone = new Promise<void>((resolve) => {
      child.once('exit', () => ((exited = true), resolve()));
      child.once('error', () => ((exited = true), resolve()));
    });
    const started = performance.now();
    try {
      while (performance.now() - started < timeoutMs) {
        const text = await fsp.readFile(consoleLog, 'latin1').catch(() => '');
        if (text.includes('FERRY-READY')) {
          return { accel: 'kvm', reason: `a KVM guest reached its ready line in ${Math.round(performance.now() - started)} ms` };
        }
        if (exited) return { accel: 'tcg', reason: `QEMU with -accel kvm exited at once: ${stderr.trim().split('\n').pop() ?? 'no message'}` };
        await sleep(100);
      }
      return { accel: 'tcg', reason: `a KVM guest did not reach its ready line within ${timeoutMs} ms (${KVM_DEVICE} opens, but KVM guests hang here)` };
    } finally {
      if (!exited) child.kill('SIGKILL');
      await gone;
    }
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
}
