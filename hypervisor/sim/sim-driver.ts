// The simulated hypervisor: every VM is a detached OS process (vm-main) driven over its control socket.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { logTail } from '../log-tail';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import type { Logger } from 'pino';
import { nodeEntryArgs } from '../../common/node-entry';
import { vmId as checkVmId, type VmId } from '../../common/types';
import type { DiskAccess, HypervisorDriver, VmExit, VmSpec, VmStatus } from '../driver';
import { ControlClient } from '../control/client';
import { FileDiskAccess } from '../file-disk';
import { HypervisorError } from '../errors';
import { fillDisk, parseCpuState, validateSpec } from './guest';
import { verifyAgainstReference } from './verify';
import { SimVmHandle, toVmStatus } from './vm-handle';
import { VmPaths, controlSocketPath, isVmProcessAlive, readJson, readPid, writeFileAtomic, type SavedRun, type VmConfig } from './vm-files';
import { CrashWatch, waitForExit } from '../crash-watch';
import { describeExit } from '../exit';
import { setTimeout as sleep } from 'node:timers/promises';
import { removeVmDir } from '../vm-dir';

export type SimLogger = Pick<Logger, 'info' | 'warn' | 'debug'>;

export interface SimDriverOptions {
  /** State directory of this simulated host; VMs live in <home>/vms/<vmId>/. */
  home: string;
  log?: SimLogger;
  /** How long start() waits for the VM's control socket (default 20 s). */
  startTimeoutMs?: number;
  /** How long stop() waits for a clean exit (default 60 s: memory.bin of a large VM takes a while). */
  stopTimeoutMs?: number;
}

export interface SimCreateOptions {
  incoming?: boolean;
  /**
   * Build the VM on the disk.img that `destroy(vm, { keepDisk: true })` left behind (the base of an
   * incremental migration) instead of a fresh sparse image. Its size must match the spec.
   */
  reuseDisk?: boolean;
}

export interface SimStartOptions {
  /** Start with the guest paused (ops stay at their value until resume/runUntil). Ignored for incoming VMs. */
  paused?: boolean;
}

const VM_MAIN = path.join(__dirname, 'vm-main');

export class SimDriver implements HypervisorDriver {
  readonly kind = 'sim';
  readonly home: string;
  private readonly log: SimLogger | undefined;
  private readonly startTimeoutMs: number;
  private readonly stopTimeoutMs: number;
  private readonly crashes: CrashWatch;

  constructor(opts: SimDriverOptions) {
    this.home = path.resolve(opts.home);
    this.log = opts.log;
    this.startTimeoutMs = opts.startTimeoutMs ?? 20_000;
    this.stopTimeoutMs = opts.stopTimeoutMs ?? 60_000;
    this.crashes = new CrashWatch({
      vms: () => this.vmIds(),
      livePid: (vm) => this.livePid(vm),
      exitFile: (vm) => this.paths(vm).exit,
      cleanlyStopped: (vm) => !fs.existsSync(this.paths(vm).pid),
    });
  }

  async describe(): Promise<{ kind: string; accel: string; version: string }> {
    return { kind: 'sim', accel: 'sim', version: `node ${process.version}` };
  }

  onCrash(cb: (vm: VmId, exit: VmExit) => void): () => void {
    return this.crashes.subscribe(cb);
  }

  private vmIds(): VmId[] {
    try {
      return fs.readdirSync(path.join(this.home, 'vms')).filter((n) => fs.existsSync(path.join(this.home, 'vms', n, 'vm.json'))) as VmId[];
    } catch {
      return [];
    }
  }

  private handle(vm: VmId, client: ControlClient, p: VmPaths): SimVmHandle {
    const socket = controlSocketPath(p);
    return new SimVmHandle(vm, client, p.disk, () => ControlClient.connect(socket, { expectVmId: vm, timeoutMs: 2_000 }), (h) =>
      verifyAgainstReference(h, this.config(p, vm).spec),
    );
  }

  async openImage(vm: VmId): Promise<DiskAccess> {
    return FileDiskAccess.open(this.paths(vm).disk);
  }

  /** Kills the VM process at once (no clean stop); its files stay. */
  async kill(vm: VmId): Promise<void> {
    const p = this.paths(vm);
    const pid = readPid(p);
    if (pid === null || !isVmProcessAlive(pid, p.dir)) return;
    this.crashes.expectExit(vm);
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
    if (!(await waitForExit(() => isVmProcessAlive(pid, p.dir), 10_000))) throw new HypervisorError('Timeout', `VM ${vm} (pid ${pid}) survived SIGKILL`);
    fs.rmSync(p.pid, { force: true });
  }

  private paths(vm: VmId | string): VmPaths {
    try {
      checkVmId(vm);
    } catch (e) {
      throw new HypervisorError('InvalidArgument', (e as Error).message);
    }
    return new VmPaths(path.join(this.home, 'vms', vm));
  }

  private config(p: VmPaths, vm: string): VmConfig {
    const c = readJson<VmConfig>(p.config);
    if (!c) throw new HypervisorError('VmNotFound', `no VM ${vm} under ${this.home}: create it first`);
    return c;
  }

  /** The pid of the VM's live process, or null. */
  livePid(vm: VmId | string): number | null {
    const p = this.paths(vm);
    const pid = readPid(p);
    return pid !== null && isVmProcessAlive(pid, p.dir) ? pid : null;
  }

  diskPath(vm: VmId): string {
    return this.paths(vm).disk;
  }

  async exists(vm: VmId): Promise<boolean> {
    return fs.existsSync(this.paths(vm).config);
  }

  async create(spec: VmSpec, opts: SimCreateOptions = {}): Promise<VmStatus> {
    validateSpec(spec);
    const p = this.paths(spec.vmId);
    if (fs.existsSync(p.config)) {
      throw new HypervisorError('VmExists', `VM ${spec.vmId} already exists under ${this.home}: destroy it first or pick another id`);
    }
    const newDir = !fs.existsSync(p.dir);
    await fsp.mkdir(p.bitmaps, { recursive: true });
    const hasDisk = fs.existsSync(p.disk);
    try {
      if (opts.reuseDisk) {
        if (!hasDisk) throw new HypervisorError('InvalidArgument', `reuseDisk: no kept disk at ${p.disk}: create without reuseDisk`);
        const { size } = await fsp.stat(p.disk);
        if (size !== spec.diskBytes) {
          throw new HypervisorError('InvalidArgument', `reuseDisk: the kept disk is ${size} bytes, the spec says ${spec.diskBytes}: destroy it and create afresh`);
        }
      } else {
        if (hasDisk) {
          throw new HypervisorError(
            'VmExists',
            `a kept disk of VM ${spec.vmId} exists at ${p.disk}: pass reuseDisk: true to build on it, or destroy(${spec.vmId}) to delete it`,
          );
        }
        const file = await fsp.open(p.disk, 'wx');
        try {
          await file.truncate(spec.diskBytes);
          if (spec.fill && !opts.incoming) await fillDisk(file, spec);
          await file.sync();
        } finally {
          await file.close();
        }
      }
      const config: VmConfig = { spec: { ...spec }, incoming: opts.incoming ?? false, createdAt: new Date().toISOString() };
      writeFileAtomic(p.config, JSON.stringify(config, null, 2));
      this.log?.info({ vmId: spec.vmId, incoming: config.incoming, diskBytes: spec.diskBytes }, 'VM created');
      return this.stoppedStatus(p, config);
    } catch (e) {
      // Half a VM is no VM: remove what this call wrote (a kept disk it was asked to build on stays).
      if (newDir) await fsp.rm(p.dir, { recursive: true, force: true });
      else if (!hasDisk) await fsp.rm(p.disk, { force: true });
      throw e;
    }
  }

  async start(vm: VmId, opts: SimStartOptions = {}): Promise<SimVmHandle> {
    const p = this.paths(vm);
    this.config(p, vm);
    if (this.livePid(vm) !== null) return this.attach(vm);
    const logFd = fs.openSync(p.log, 'a');
    let exited: number | null = null;
    let child;
    try {
      child = spawn(process.execPath, [...nodeEntryArgs(VM_MAIN), p.dir, ...(opts.paused ? ['--paused'] : [])], {
        detached: true,
        stdio: ['ignore', logFd, logFd],
        cwd: p.dir,
      });
    } finally {
      fs.closeSync(logFd);
    }
    child.on('exit', (code, signal) => {
      exited = code ?? (signal ? 128 : -1);
      this.crashes.exited(vm, code, signal);
    });
    child.on('error', () => (exited = -1));
    child.unref();
    const deadline = Date.now() + this.startTimeoutMs;
    const socket = controlSocketPath(p);
    while (Date.now() < deadline) {
      if (exited !== null) {
        if (exited === 3 && this.livePid(vm) !== null) return this.attach(vm); // lost a race with another start
        throw new HypervisorError('GenericError', `VM ${vm} process exited with code ${exited} while starting; ${p.log} says:\n${logTail(p.log)}`);
      }
      if (fs.existsSync(socket)) {
        try {
          const client = await ControlClient.connect(socket, { expectVmId: vm, timeoutMs: 2_000 });
          this.log?.info({ vmId: vm, pid: client.greeting.pid }, 'VM process started');
          fs.rmSync(p.exit, { force: true });
          return this.handle(vm, client, p);
        } catch {
          // not listening yet, or the socket of a dead predecessor
        }
      }
      await sleep(25);
    }
    if (child.pid) process.kill(child.pid, 'SIGKILL');
    throw new HypervisorError('Timeout', `VM ${vm} did not answer on ${socket} within ${this.startTimeoutMs} ms; ${p.log} says:\n${logTail(p.log)}`);
  }

  async attach(vm: VmId): Promise<SimVmHandle> {
    const p = this.paths(vm);
    this.config(p, vm);
    const pid = this.livePid(vm);
    if (pid === null) {
      const exit = this.crashes.lastExit(vm);
      throw new HypervisorError(
        'VmNotRunning',
        exit ? `VM ${vm} crashed (${describeExit(exit)}): start it again with ferry vm start` : `VM ${vm} has no running process: start it`,
      );
    }
    let lastError: unknown;
    for (let i = 0; i < 40; i++) {
      try {
        const client = await ControlClient.connect(controlSocketPath(p), { expectVmId: vm, timeoutMs: 2_000 });
        return this.handle(vm, client, p);
      } catch (e) {
        lastError = e; // a process that is still starting has not opened its socket yet
        if (this.livePid(vm) === null) throw new HypervisorError('VmNotRunning', `VM ${vm} process ${pid} exited: start it`);
        await sleep(50);
      }
    }
    throw lastError;
  }

  async stop(vm: VmId): Promise<void> {
    const p = this.paths(vm);
    this.config(p, vm);
    const pid = this.livePid(vm);
    if (pid === null) return;
    this.crashes.expectExit(vm);
    try {
      const client = await ControlClient.connect(controlSocketPath(p), { expectVmId: vm, timeoutMs: 2_000 });
      try {
        await client.request('quit', {}, undefined, 10_000);
      } finally {
        client.close();
      }
    } catch (e) {
      this.log?.warn({ vmId: vm, err: String(e) }, 'quit over the control socket failed; sending SIGTERM (also a clean stop)');
      process.kill(pid, 'SIGTERM');
    }
    if (!(await waitForExit(() => isVmProcessAlive(pid, p.dir), this.stopTimeoutMs))) {
      throw new HypervisorError('Timeout', `VM ${vm} (pid ${pid}) did not stop within ${this.stopTimeoutMs} ms: see ${p.log}, or destroy it`);
    }
    this.log?.info({ vmId: vm, pid }, 'VM stopped cleanly');
  }

  /** Kills the process at once (SIGKILL: nothing of it is kept anyway) and removes the VM's files. */
  async destroy(vm: VmId, opts: { keepDisk?: boolean } = {}): Promise<void> {
    const p = this.paths(vm);
    const pid = readPid(p);
    if (pid !== null && isVmProcessAlive(pid, p.dir)) {
      this.crashes.expectExit(vm);
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
      if (!(await waitForExit(() => isVmProcessAlive(pid, p.dir), 10_000))) throw new HypervisorError('Timeout', `VM ${vm} (pid ${pid}) survived SIGKILL`);
    }
    const socket = controlSocketPath(p);
    if (socket !== p.socket) fs.rmSync(path.dirname(socket), { force: true });
    if (!fs.existsSync(p.dir)) return;
    await removeVmDir(p.dir, opts);
    this.log?.info({ vmId: vm, pid, keepDisk: !!opts.keepDisk }, 'VM destroyed');
  }

  async list(): Promise<VmStatus[]> {
    let names: string[];
    try {
      names = await fsp.readdir(path.join(this.home, 'vms'));
    } catch {
      return [];
    }
    const out: VmStatus[] = [];
    for (const name of names.sort()) {
      if (fs.existsSync(path.join(this.home, 'vms', name, 'vm.json'))) out.push(await this.inspect(name as VmId));
    }
    return out;
  }

  async inspect(vm: VmId): Promise<VmStatus> {
    const p = this.paths(vm);
    const config = this.config(p, vm);
    if (this.livePid(vm) === null) return this.stoppedStatus(p, config);
    const handle = await this.attach(vm);
    try {
      return await handle.status();
    } finally {
      handle.close();
    }
  }

  private stoppedStatus(p: VmPaths, config: VmConfig): VmStatus {
    const { spec } = config;
    const saved = readJson<SavedRun>(p.saved);
    let guest: VmStatus['guest'] = null;
    let opsPerSecond = spec.opsPerSecond;
    if (saved?.cpu) {
      try {
        const cpu = parseCpuState(Buffer.from(saved.cpu, 'base64'));
        guest = { ops: cpu.ops, reads: cpu.reads ?? 0, writes: cpu.writes ?? 0, violations: cpu.violations, lastHeartbeatMs: null, maxGapMs: 0 };
        opsPerSecond = cpu.opsPerSecond;
      } catch {
        // an unreadable saved state reads as a fresh guest
      }
    }
    const exit = this.crashes.lastExit(spec.vmId);
    return {
      ...toVmStatus({ ...spec, state: exit ? 'crashed' : 'stopped', pid: null, opsPerSecond, throttle: 0, accel: 'sim', guest } as never),
      ...(exit ? { exit } : {}),
    };
  }
}

