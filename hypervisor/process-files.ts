// The processes a driver starts, found again from their pid files (an agent restart finds its VMs
// still running), without mistaking a zombie or a recycled pid for them.
import * as fs from 'node:fs';

export function readPidFile(file: string): number | null {
  try {
    const pid = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isSafeInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/**
 * Whether `pid` is alive and its command line has the argument `arg` (a recycled pid is not taken
 * for it). A zombie (killed, not yet reaped: its parent may be gone and init may not reap) is dead.
 */
export function isLiveProcess(pid: number, arg: (a: string) => boolean): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    if (state === 'Z' || state === 'X') return false;
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').some(arg);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT' && fs.existsSync('/proc/self/stat')) return false; // exited meanwhile
    return true; // no procfs: trust kill(0)
  }
}
