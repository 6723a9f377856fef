// The files of one QEMU VM under <home>/vms/<vmId>/: its config, raw disk image, QEMU's sockets,
// pid and logs, and the postcopy disk server's files under stale/.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { VmSpec } from '../driver';
import { socketPath } from '../socket-path';
import { isLiveProcess } from '../process-files';

export interface QemuVmConfig {
  spec: VmSpec;
  /** A destination shell: QEMU starts with -incoming defer -S. Cleared once the guest runs here. */
  incoming: boolean;
  /** The guest has booted at least once: a restart must rebuild its version table from the disk. */
  booted: boolean;
  createdAt: string;
}

export class QemuVmPaths {
  constructor(readonly dir: string) {}
  get config(): string {
    return path.join(this.dir, 'vm.json');
  }
  get disk(): string {
    return path.join(this.dir, 'disk.img');
  }
  get pid(): string {
    return path.join(this.dir, 'pid');
  }
  get log(): string {
    return path.join(this.dir, 'qemu.log');
  }
  get console(): string {
    return path.join(this.dir, 'console.log');
  }
  get exit(): string {
    return path.join(this.dir, 'exit.json');
  }
  get qmp(): string {
    return socketPath(this.dir, 'qmp.sock');
  }
  get probe(): string {
    return socketPath(this.dir, 'probe.sock');
  }
  /** QEMU's own NBD server (source reads of the disk and of dirty bitmaps). */
  get exportSocket(): string {
    return socketPath(this.dir, 'exports.sock');
  }
  get staleDir(): string {
    return path.join(this.dir, 'stale');
  }
  get staleControl(): string {
    return socketPath(this.staleDir, 'control.sock');
  }
  get staleNbd(): string {
    return socketPath(this.staleDir, 'nbd.sock');
  }
  get stalePid(): string {
    return path.join(this.staleDir, 'pid');
  }
  get staleLog(): string {
    return path.join(this.staleDir, 'server.log');
  }
}

export function readConfig(p: QemuVmPaths): QemuVmConfig | null {
  try {
    return JSON.parse(fs.readFileSync(p.config, 'utf8')) as QemuVmConfig;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}

/** Whether `pid` is alive and its command line names `marker` (so a recycled pid is not taken for it). */
export function isProcessOf(pid: number, marker: string): boolean {
  return isLiveProcess(pid, (arg) => arg.includes(marker));
}
