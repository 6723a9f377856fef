// What tests of failures look at on a host: its shells, its agent's log, a process's descriptors, and
// bounds on how long an end may take.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import type { LocalCluster } from '../../harness/cluster';
import type { FerryClient, MigrationHandle } from '../../client/ferry-client';
import { setTimeout as sleep } from 'node:timers/promises';
import { waitForProgress } from './cluster';

/** Resolves with `p`, or rejects when it has not settled within `ms` (an end that never comes). */
export async function within<T>(what: string, ms: number, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} did not happen within ${ms / 1000} s`)), ms)));
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

export async function until(what: string, pred: () => Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(250);
  }
}

/** Incoming-migration records (destination shells) on a host, of one VM or of all. */
export async function shells(cluster: LocalCluster, host: string, vmId?: string): Promise<string[]> {
  const names = await fs.readdir(path.join(cluster.home(host), 'incoming')).catch(() => [] as string[]);
  return names.filter((n) => n.endsWith('.json') && (vmId === undefined || n.startsWith(`migrate-${vmId}-`)));
}

/** The ownership record of a VM on a host, read from its file. */
export async function ownershipOn(cluster: LocalCluster, host: string, vmId: string): Promise<{ state: string; epoch: number; migrationId: string | null } | null> {
  const text = await fs.readFile(path.join(cluster.home(host), 'ownership', `${vmId}.json`), 'utf8').catch(() => null);
  return text === null ? null : (JSON.parse(text) as { state: string; epoch: number; migrationId: string | null });
}

/** The id every host-side log line about this migration carries. */
export async function migrationIdOf(handle: MigrationHandle): Promise<string> {
  const d = await handle.workflow.describe();
  return `${d.workflowId}-${d.runId}`;
}

/** The JSON lines of a host agent's log that are about one migration. */
export async function agentLog(cluster: LocalCluster, host: string, migrationId: string): Promise<{ level: number; msg: string; [k: string]: unknown }[]> {
  const text = await fs.readFile(cluster.logFile(host), 'utf8').catch(() => '');
  const lines = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      const entry = JSON.parse(line) as { level: number; msg: string; migrationId?: string };
      if (entry.migrationId === migrationId) lines.push(entry);
    } catch {
      // a line cut by a kill -9
    }
  }
  return lines;
}

/** Open file descriptors of a process, and those of them that are sockets. */
export async function descriptors(pid: number): Promise<{ fds: number; sockets: number }> {
  const fds = await fs.readdir(`/proc/${pid}/fd`);
  let sockets = 0;
  for (const fd of fds) if ((await fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')).startsWith('socket:')) sockets++;
  return { fds: fds.length, sockets };
}

/** No shell, no VM process and no VM files of `vmId` on a host. */
export async function expectNothingLeftOn(cluster: LocalCluster, host: string, vmId: string): Promise<void> {
  expect(await shells(cluster, host, vmId)).toEqual([]);
  expect((await cluster.vmProcesses(host)).map((p) => p.vmId)).not.toContain(vmId);
  const dir = path.join(cluster.home(host), 'vms', vmId);
  expect(await fs.readdir(dir).then((names) => `files left in ${dir}: ${names.join(', ')}`, () => 'none')).toBe('none');
}

export { guestWorking } from '../../harness/guest-working';

/**
 * A migration whose stale blocks are left to a slow postcopy: one disk round, a freeze as soon as the
 * memory allows (10 s downtime target), and the link at `bandwidth`, so the blocks the guest writes
 * meanwhile are stale at the commit and cross slowly while it reads them. `slowFrom: 'memory-precopy'`
 * (for a guest whose memory precopy lasts seconds, a QEMU one) lets the disk cross at full speed
 * first; `'start'` (a small simulated VM: 8 MiB of disk takes 8 s at 1 MiB/s) slows the whole
 * migration, since a memory precopy of milliseconds can end before a poll sees it.
 */
export async function migrateIntoSlowPostcopy(ferry: FerryClient, vmId: string, from: string, to: string, bandwidth: number, slowFrom: 'start' | 'memory-precopy'): Promise<MigrationHandle> {
  const handle = await ferry.migrate({
    vmId,
    sourceHost: from,
    destinationHosts: [to],
    convergence: { maxRounds: 1, dirtyBlockThreshold: 1_000_000 },
    downtimeTargetMs: 10_000,
    ...(slowFrom === 'start' ? { bandwidthBytesPerSecond: bandwidth } : {}),
  });
  if (slowFrom === 'memory-precopy') {
    await waitForProgress(handle, 'the memory precopy', (p) => p.phase === 'memory-precopy');
    await handle.setBandwidth(bandwidth);
  }
  return handle;
}

/** The pid of a VM's process on a host. */
export async function vmPid(cluster: LocalCluster, host: string, vmId: string): Promise<number> {
  const p = (await cluster.vmProcesses(host)).find((v) => v.vmId === vmId);
  if (!p) throw new Error(`no VM process for ${vmId} on ${host}`);
  return p.pid;
}

/** Temp files of atomic writes anywhere under a host's home. */
export async function tempFiles(cluster: LocalCluster, host: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await fs.readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (e.isDirectory()) await walk(path.join(dir, e.name));
      else if (/\.tmp$|\.tmp-\d+$/.test(e.name)) out.push(path.join(dir, e.name));
    }
  };
  await walk(cluster.home(host));
  return out;
}
