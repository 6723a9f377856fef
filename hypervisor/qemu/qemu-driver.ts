// The QEMU hypervisor: every VM is a detached qemu-system-x86_64 process (it outlives the agent; a
// restarted agent reattaches through its QMP socket) with a raw disk image, `-blockdev` node names,
// QMP and the guest probe on Unix sockets, and Ferry's guest program in its initramfs.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { logTail } from '../log-tail';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { vmId as checkVmId, SECTOR_BYTES, type VmId } from '../../common/types';
import type { CreateOptions, DiskAccess, HypervisorDriver, VmExit, VmSpec, VmStatus } from '../driver';
import { CrashWatch, waitForExit } from '../crash-watch';
import { describeExit } from '../exit';
import { HypervisorError } from '../errors';
import { FileDiskAccess } from '../file-disk';
import { qemuArgs, type QemuAccel } from './command-line';
import { fillImage, MAX_GUEST_SEED } from './guest-content';
import { guestKernelCmdline, GUEST_WORKLOADS, type GuestWorkload } from './guest-params';
import { GuestProbe } from './guest-probe';
import { PostcopyDisk } from './postcopy-disk';
import { cancelOrphanStream } from './machine-stream';
import { QmpClient } from './qmp/client';
import { createConnection, QemuVmHandle, runState, type QemuConnection } from './vm-handle';
import { QemuVmPaths, isProcessOf, readConfig, type QemuVmConfig } from './vm-files';
import { readPidFile } from '../process-files';
import { removeVmDir } from '../vm-dir';

export interface QemuDriverOptions {
  home: string;
  qemuSystem: string;
  qemuVersion: string;
  /** Ferry's guest: the kernel and the initramfs with the guest program. */
  kernel: string;
  initrd: string;
  accel: QemuAccel;
  log?: { info(o: object, msg: string): void; warn(o: object, msg: string): void };
  startTimeoutMs?: number;
}

const MIB = 1024 * 1024;
const GUEST_BLOCK = 4096;

export class QemuDriver implements HypervisorDriver {
  readonly kind = 'qemu';
  readonly home: string;
  private readonly connections = new Map<string, Promise<QemuConnection>>();
  private readonly crashes: CrashWatch;

  constructor(private readonly opts: QemuDriverOptions) {
    this.home = path.resolve(opts.home);
    this.crashes = new CrashWatch({
      vms: () => this.vmIds(),
      livePid: (vm) => this.livePid(vm),
      exitFile: (vm) => this.paths(vm).exit,
      cleanlyStopped: () => false,
    });
  }

  async describe(): Promise<{ kind: string; accel: string; version: string }> {
    return { kind: 'qemu', accel: this.opts.accel, version: `QEMU ${this.opts.qemuVersion}` };
  }

  onCrash(cb: (vm: VmId, exit: VmExit) => void): () => void {
    return this.crashes.subscribe(cb);
  }

  private paths(vm: VmId | string): QemuVmPaths {
    try {
      checkVmId(vm);
    } catch (e) {
      throw new HypervisorError('InvalidArgument', (e as Error).message);
    }
    return new QemuVmPaths(path.join(this.home, 'vms', vm));
  }

  private config(vm: VmId | string): QemuVmConfig {
    const c = readConfig(this.paths(vm));
    if (!c) throw new HypervisorError('VmNotFound', `no VM ${vm} under ${this.home}: create it first`);
    return c;
  }

  private writeConfig(vm: VmId | string, config: QemuVmConfig): void {
    const p = this.paths(vm);
    const tmp = `${p.config}.tmp-${process.pid}`;
    fs.writeFileSync(tmp, JSON.stringify(config, null, 2));
    fs.renameSync(tmp, p.config);
  }

  private vmIds(): VmId[] {
    try {
      return fs.readdirSync(path.join(this.home, 'vms')).filter((n) => fs.existsSync(path.join(this.home, 'vms', n, 'vm.json'))) as VmId[];
    } catch {
      return [];
    }
  }

  livePid(vm: VmId | string): number | null {
    const p = this.paths(vm);
    const pid = readPidFile(p.pid);
    return pid !== null && isProcessOf(pid, p.dir) ? pid : null;
  }

  diskPath(vm: VmId): string {
    return this.paths(vm).disk;
  }

  async exists(vm: VmId): Promise<boolean> {
    return fs.existsSync(this.paths(vm).config);
  }

  async openImage(vm: VmId): Promise<DiskAccess> {
    return FileDiskAccess.open(this.paths(vm).disk);
  }

  async create(spec: VmSpec, opts: CreateOptions = {}): Promise<VmStatus> {
    validate(spec);
    const p = this.paths(spec.vmId);
    if (fs.existsSync(p.config)) throw new HypervisorError('VmExists', `VM ${spec.vmId} already exists under ${this.home}: destroy it first or pick another id`);
    await fsp.mkdir(p.dir, { recursive: true });
    const hasDisk = fs.existsSync(p.disk);
    if (opts.reuseDisk) {
      if (!hasDisk) throw new HypervisorError('InvalidArgument', `reuseDisk: no kept disk at ${p.disk}: create without reuseDisk`);
      const { size } = await fsp.stat(p.disk);
      if (size !== spec.diskBytes) throw new HypervisorError('InvalidArgument', `reuseDisk: the kept disk is ${size} bytes, the spec says ${spec.diskBytes}`);
    } else {
      if (hasDisk) {
        throw new HypervisorError('VmExists', `a kept disk of VM ${spec.vmId} exists at ${p.disk}: pass reuseDisk: true to build on it, or destroy(${spec.vmId}) to delete it`);
      }
      const file = await fsp.open(p.disk, 'wx');
      try {
        await file.truncate(spec.diskBytes);
        await file.sync();
      } finally {
        await file.close();
      }
      if (spec.fill && !opts.incoming) await fillImage(p.disk, spec.seed, spec.diskBytes);
    }
    this.writeConfig(spec.vmId, { spec: { ...spec }, incoming: opts.incoming ?? false, booted: false, createdAt: new Date().toISOString() });
    this.opts.log?.info({ vmId: spec.vmId, incoming: opts.incoming ?? false, diskBytes: spec.diskBytes }, 'VM created');
    return this.stoppedStatus(spec.vmId);
  }

  async start(vm: VmId, opts: { paused?: boolean } = {}): Promise<QemuVmHandle> {
    const config = this.config(vm);
    if (this.livePid(vm) !== null) return this.attach(vm);
    const p = this.paths(vm);
    const { spec } = config;
    const boot = spec.boot ?? {};
    const ours = !boot.kernel && !boot.initrd;
    const append = ours
      ? guestKernelCmdline({ seed: spec.seed, workload: spec.workload as GuestWorkload, rate: spec.opsPerSecond, fill: spec.fill === true, rescan: config.booted })
      : boot.append ?? 'console=ttyS0 panic=-1';
    const args = qemuArgs({
      vmId: vm,
      memoryBytes: spec.memoryBytes,
      vcpus: spec.vcpus ?? 1,
      accel: this.opts.accel,
      kernel: boot.kernel ?? this.opts.kernel,
      initrd: boot.initrd ?? this.opts.initrd,
      append: ours && boot.append ? `${append} ${boot.append}` : append,
      qmpSocket: p.qmp,
      consoleLog: p.console,
      probeSocket: p.probe,
      pidFile: p.pid,
      disk: { kind: 'file', path: p.disk },
      incoming: config.incoming,
      paused: config.incoming || opts.paused,
    });
    for (const f of [p.pid, p.exit]) fs.rmSync(f, { force: true });
    fs.rmSync(p.qmp, { force: true });
    fs.rmSync(p.probe, { force: true });
    const logFd = fs.openSync(p.log, 'a');
    let exited: string | null = null;
    try {
      const child = spawn(this.opts.qemuSystem, args, { detached: true, stdio: ['ignore', logFd, logFd], cwd: p.dir });
      child.on('exit', (code, signal) => {
        exited = signal ? `signal ${signal}` : `exit status ${code}`;
        this.dropConnection(vm);
        this.crashes.exited(vm, code, signal);
      });
      child.on('error', (err) => (exited = err.message));
      child.unref();
    } finally {
      fs.closeSync(logFd);
    }
    const deadline = Date.now() + (this.opts.startTimeoutMs ?? 30_000);
    while (this.livePid(vm) === null) {
      if (exited !== null) throw new HypervisorError('GenericError', `QEMU for VM ${vm} exited at start (${exited}); it said:\n${logTail(p.log)}`);
      if (Date.now() > deadline) throw new HypervisorError('Timeout', `QEMU for VM ${vm} did not start within ${this.opts.startTimeoutMs ?? 30_000} ms; ${p.log} says:\n${logTail(p.log)}`);
      await sleep(20);
    }
    if (!config.incoming && !config.booted) this.writeConfig(vm, { ...config, booted: true });
    const handle = await this.attach(vm);
    this.opts.log?.info({ vmId: vm, pid: handle.pid, accel: this.opts.accel, incoming: config.incoming }, 'VM process started');
    return handle;
  }

  async attach(vm: VmId): Promise<QemuVmHandle> {
    const p = this.paths(vm);
    this.config(vm);
    const pid = this.livePid(vm);
    if (pid === null) {
      const exit = this.crashes.lastExit(vm);
      throw new HypervisorError('VmNotRunning', exit ? `VM ${vm} crashed (${describeExit(exit)}): start it again with ferry vm start` : `VM ${vm} has no running QEMU: start it`);
    }
    let conn = this.connections.get(vm);
    if (conn) {
      const c = await conn.catch(() => null);
      if (!c || c.pid !== pid || c.qmp.closed) {
        this.dropConnection(vm);
        conn = undefined;
      }
    }
    if (!conn) {
      conn = this.connect(vm, pid, p);
      this.connections.set(vm, conn);
      conn.catch(() => this.connections.delete(vm));
    }
    return new QemuVmHandle(
      vm,
      await conn,
      p,
      () => this.config(vm),
      (update) => this.writeConfig(vm, { ...this.config(vm), ...update }),
      this.opts.accel,
    );
  }

  /**
   * Forgets a VM's connection and closes its QMP and probe: a probe left open would reconnect to the
   * next QEMU on the same socket path and hold its only client slot (QEMU's socket chardev serves one
   * client), so the next connection's probe would hear nothing.
   */
  private dropConnection(vm: VmId): void {
    const conn = this.connections.get(vm);
    if (!conn) return;
    this.connections.delete(vm);
    void conn.then(
      (c) => {
        c.probe?.close();
        if (!c.qmp.closed) void c.qmp.close().catch(() => undefined);
      },
      () => undefined,
    );
  }

  private async connect(vm: VmId, pid: number, p: QemuVmPaths): Promise<QemuConnection> {
    const config = this.config(vm);
    const qmp = await QmpClient.connect(p.qmp, { timeoutMs: 15_000 });
    // This process starts its streams on its own connections: one found on a new connection is an orphan.
    if (!config.incoming) await cancelOrphanStream(qmp, vm);
    qmp.onClose(() => {
      void this.connections.get(vm)?.then(
        (c) => c.qmp === qmp && this.dropConnection(vm),
        () => undefined,
      );
    });
    const ours = !config.spec.boot?.kernel && !config.spec.boot?.initrd;
    const probe = ours ? await GuestProbe.connect(p.probe, { connectTimeoutMs: 15_000 }).catch(() => null) : null;
    return createConnection(pid, qmp, probe, p, config.spec.diskBytes, new PostcopyDisk(p, vm));
  }

  async stop(vm: VmId): Promise<void> {
    const pid = this.livePid(vm);
    if (pid === null) return;
    this.crashes.expectExit(vm);
    const handle = await this.attach(vm);
    await handle.stopProcess().catch(() => process.kill(pid, 'SIGTERM'));
    if (!(await waitForExit(() => this.livePid(vm) !== null, 30_000))) throw new HypervisorError('Timeout', `QEMU of VM ${vm} (pid ${pid}) did not stop within 30 s: destroy it`);
  }

  async kill(vm: VmId): Promise<void> {
    const pid = this.livePid(vm);
    if (pid === null) return;
    this.crashes.expectExit(vm);
    process.kill(pid, 'SIGKILL');
    if (!(await waitForExit(() => this.livePid(vm) !== null, 10_000))) throw new HypervisorError('Timeout', `QEMU of VM ${vm} (pid ${pid}) survived SIGKILL`);
    this.dropConnection(vm);
  }

  async destroy(vm: VmId, opts: { keepDisk?: boolean } = {}): Promise<void> {
    const p = this.paths(vm);
    await this.kill(vm);
    new PostcopyDisk(p, vm).kill();
    if (!fs.existsSync(p.dir)) return;
    await removeVmDir(p.dir, opts);
    this.opts.log?.info({ vmId: vm, keepDisk: !!opts.keepDisk }, 'VM destroyed');
  }

  async list(): Promise<VmStatus[]> {
    const out: VmStatus[] = [];
    for (const vm of this.vmIds().sort()) out.push(await this.inspect(vm));
    return out;
  }

  async inspect(vm: VmId): Promise<VmStatus> {
    this.config(vm);
    if (this.livePid(vm) === null) return this.stoppedStatus(vm);
    return (await this.attach(vm)).status();
  }

  private stoppedStatus(vm: VmId): VmStatus {
    const { spec } = this.config(vm);
    const exit = this.crashes.lastExit(vm);
    return {
      vmId: spec.vmId,
      state: exit ? 'crashed' : 'stopped',
      pid: null,
      diskBytes: spec.diskBytes,
      memoryBytes: spec.memoryBytes,
      workload: spec.workload,
      seed: spec.seed,
      opsPerSecond: spec.opsPerSecond,
      fill: spec.fill === true,
      throttle: 0,
      accel: this.opts.accel,
      guest: null,
      ...(exit ? { exit } : {}),
    };
  }
}

export { runState };

function validate(spec: VmSpec): void {
  const bad = (msg: string): never => {
    throw new HypervisorError('InvalidArgument', msg);
  };
  if (!Number.isSafeInteger(spec.diskBytes) || spec.diskBytes < GUEST_BLOCK || spec.diskBytes % SECTOR_BYTES !== 0) {
    bad(`diskBytes ${spec.diskBytes}: use a whole number of ${SECTOR_BYTES}-byte sectors, at least ${GUEST_BLOCK}`);
  }
  if (!Number.isSafeInteger(spec.memoryBytes) || spec.memoryBytes < 64 * MIB || spec.memoryBytes % MIB !== 0) {
    bad(`memoryBytes ${spec.memoryBytes}: a QEMU guest takes whole MiB, at least 64 MiB (its kernel and the guest program need them)`);
  }
  if (spec.vcpus !== undefined && (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 64)) bad(`vcpus ${spec.vcpus}: use 1 to 64`);
  if (!GUEST_WORKLOADS.includes(spec.workload as GuestWorkload)) bad(`workload ${JSON.stringify(spec.workload)}: use one of ${GUEST_WORKLOADS.join(', ')}`);
  if (!Number.isSafeInteger(spec.seed) || spec.seed < 0 || spec.seed > MAX_GUEST_SEED) bad(`seed ${spec.seed}: use a whole number from 0 to ${MAX_GUEST_SEED}`);
  if (!Number.isInteger(spec.opsPerSecond) || spec.opsPerSecond < 0) bad(`opsPerSecond ${spec.opsPerSecond}: use a whole number >= 0 (0 = as fast as it can)`);
  for (const [what, file] of [['kernel', spec.boot?.kernel], ['initrd', spec.boot?.initrd]] as const) {
    if (file !== undefined && !fs.existsSync(file)) bad(`the ${what} ${file} does not exist on this host: give a path on the host that runs the VM`);
  }
}


