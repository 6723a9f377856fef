// The files of one simulated VM under <home>/vms/<vmId>/ and the helpers both the driver and the VM
// process use on them.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { VmSpec } from '../driver';
import { socketPath } from '../socket-path';
import { tempFileFor } from '../../common/durable-file';
import { isLiveProcess, readPidFile } from '../process-files';

export interface VmConfig {
  spec: VmSpec;
  /** A destination shell: the process starts in state 'incoming'. Cleared once it resumes. */
  incoming: boolean;
  createdAt: string;
}

/** What a clean stop leaves besides memory.bin, so the VM can be started again where it was. */
export interface SavedRun {
  incoming: boolean;
  /** Base64 of the guest CPU state, or null when no guest was loaded (incoming shell). */
  cpu: string | null;
  /** Postcopy not finished: the stale blocks (base64 bits) must survive the restart. */
  stale?: { blockBytes: number; bits: string } | null;
  stoppedAt: string;
}

export class VmPaths {
  constructor(readonly dir: string) {}
  get config(): string {
    return path.join(this.dir, 'vm.json');
  }
  get disk(): string {
    return path.join(this.dir, 'disk.img');
  }
  get socket(): string {
    return path.join(this.dir, 'control.sock');
  }
  get pid(): string {
    return path.join(this.dir, 'pid');
  }
  get log(): string {
    return path.join(this.dir, 'vm.log');
  }
  get bitmaps(): string {
    return path.join(this.dir, 'bitmaps');
  }
  get memory(): string {
    return path.join(this.dir, 'memory.bin');
  }
  get saved(): string {
    return path.join(this.dir, 'saved.json');
  }
  /** How the last process ended when it did not stop cleanly (written by the driver that saw it exit). */
  get exit(): string {
    return path.join(this.dir, 'exit.json');
  }
}

/** Write-to-temp, fsync, rename, fsync the directory: the file is either old or new after a crash. */
export function writeFileAtomic(file: string, data: string | Buffer): void {
  const tmp = tempFileFor(file);
  try {
    const fd = fs.openSync(tmp, 'w');
    try {
      fs.writeFileSync(fd, data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  const dfd = fs.openSync(path.dirname(file), 'r');
  try {
    fs.fsyncSync(dfd);
  } finally {
    fs.closeSync(dfd);
  }
}

export function readJson<T>(file: string): T | null {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}

export function readPid(paths: VmPaths): number | null {
  return readPidFile(paths.pid);
}

/** Whether `pid` is a live VM process of this directory (its command line names the directory). */
export function isVmProcessAlive(pid: number, dir: string): boolean {
  return isLiveProcess(pid, (arg) => arg === dir);
}

/** The VM's control socket (through a short symlink when its directory is deep: see socket-path.ts). */
export function controlSocketPath(paths: VmPaths): string {
  return socketPath(paths.dir, 'control.sock');
}
