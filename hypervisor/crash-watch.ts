// Notices VM processes that die without a clean stop, within a second, for both drivers: the exit of a
// process this agent started is reported with its status or signal; a process it only attached to
// (after an agent restart) is polled, and its exit status is unknown.
import * as fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { VmId } from '../common/types';
import type { VmExit } from './driver';

const POLL_MS = 500;

export interface CrashWatchDeps {
  vms(): VmId[];
  livePid(vm: VmId): number | null;
  /** Where the VM's last unclean exit is recorded (it survives agent restarts). */
  exitFile(vm: VmId): string;
  /** True when the process that ended had stopped cleanly (its own shutdown path ran). */
  cleanlyStopped(vm: VmId): boolean;
}

export class CrashWatch {
  private readonly listeners = new Set<(vm: VmId, exit: VmExit) => void>();
  private readonly alive = new Map<VmId, number>();
  private readonly expected = new Set<VmId>();
  /** VMs the first poll has looked at (a process that died while no agent watched is recorded then). */
  private readonly checked = new Set<VmId>();
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly deps: CrashWatchDeps) {}

  subscribe(cb: (vm: VmId, exit: VmExit) => void): () => void {
    this.listeners.add(cb);
    if (!this.timer) {
      this.timer = setInterval(() => this.poll(), POLL_MS);
      this.timer.unref();
    }
    return () => {
      this.listeners.delete(cb);
      if (this.listeners.size === 0 && this.timer) {
        clearInterval(this.timer);
        this.timer = null;
      }
    };
  }

  /** The driver is about to stop or kill the VM's process on purpose: that exit is no crash. */
  expectExit(vm: VmId): void {
    this.expected.add(vm);
  }

  /** A process this agent started exited. */
  exited(vm: VmId, code: number | null, signal: NodeJS.Signals | null): void {
    this.alive.delete(vm);
    if (this.expected.delete(vm)) return;
    if (this.deps.cleanlyStopped(vm) && code === 0) return;
    this.record(vm, { code, signal, at: new Date().toISOString() });
  }

  lastExit(vm: VmId): VmExit | null {
    try {
      return JSON.parse(fs.readFileSync(this.deps.exitFile(vm), 'utf8')) as VmExit;
    } catch {
      return null;
    }
  }

  private poll(): void {
    for (const vm of this.deps.vms()) {
      const pid = this.deps.livePid(vm);
      if (pid !== null) {
        this.alive.set(vm, pid);
        this.checked.add(vm);
        continue;
      }
      if (!this.alive.has(vm)) {
        if (!this.checked.has(vm) && !this.deps.cleanlyStopped(vm) && !this.lastExit(vm)) {
          this.record(vm, { code: null, signal: null, at: new Date().toISOString() }); // died while no agent watched it
        }
        this.checked.add(vm);
        continue;
      }
      this.alive.delete(vm);
      if (this.expected.delete(vm)) continue;
      if (!this.deps.cleanlyStopped(vm) && !this.lastExit(vm)) this.record(vm, { code: null, signal: null, at: new Date().toISOString() });
    }
  }

  private record(vm: VmId, exit: VmExit): void {
    try {
      fs.writeFileSync(this.deps.exitFile(vm), JSON.stringify(exit));
    } catch {
      return; // the VM's directory is gone: it was destroyed, not crashed
    }
    for (const cb of this.listeners) cb(vm, exit);
  }
}

/** Waits until `alive()` is false (true), or gives up after `timeoutMs` (false). */
export async function waitForExit(alive: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (alive()) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}
