// What must hold after every cell, whatever the fault: one VM process, on the host the workflow names;
// no stale read; byte-identical data against the reference run; a clear end state; nothing left over.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import type { VmSpec } from '../hypervisor/driver';
import type { ChaosEnv } from './env';

export interface VmCopy {
  host: string;
  pid: number;
  state: string;
}

/** Every live VM process of `vmId` across the hosts, with its run state as its host reports it. */
export async function vmCopies(env: ChaosEnv, vmId: string): Promise<VmCopy[]> {
  const out: VmCopy[] = [];
  for (const host of env.hosts) {
    for (const p of await env.cluster.vmProcesses(host)) {
      if (p.vmId !== vmId) continue;
      const state = env.cluster.agents.has(host)
        ? (await env.ferry.hostCommand(host, 'vmInspect', { vmId }).catch(() => null))?.state ?? 'unknown'
        : 'unknown (no agent)';
      out.push({ host, pid: p.pid, state });
    }
  }
  return out;
}

export interface GuestCheck {
  violations: number;
  hashesEqual: boolean | null;
  ops: number;
}

/** The guest's own check where it runs (the simulator: disk and memory against a reference run). */
export async function checkGuest(env: ChaosEnv, host: string, spec: VmSpec): Promise<GuestCheck> {
  const verified = await env.ferry.hostCommand(host, 'vmVerify', { vmId: spec.vmId });
  const after = await env.ferry.hostCommand(host, 'vmInspect', { vmId: spec.vmId });
  return { violations: verified.violations, hashesEqual: verified.violations === 0, ops: after.guest?.ops ?? 0 };
}

/** Violations so far, without running the guest (a paused VM that must stay paused). */
export async function violationsOnly(env: ChaosEnv, host: string, vmId: string): Promise<GuestCheck> {
  const s = await env.ferry.hostCommand(host, 'vmInspect', { vmId });
  return { violations: s.guest?.violations ?? 0, hashesEqual: null, ops: s.guest?.ops ?? 0 };
}

/**
 * Leftovers: processes under the run's root that are neither an agent nor an expected VM process,
 * listening TCP ports of those processes other than the agents' data ports, incoming-migration
 * records (destination shells) on any host once no migration runs, and the VM's files on a host it
 * does not run on (unless kept as a base).
 */
export async function leftovers(env: ChaosEnv, vm: { vmId: string; host: string }, expectedVmPids: number[]): Promise<string[]> {
  const problems: string[] = [];
  const agentPids = new Set([...env.cluster.agents.values()].map((a) => a.process.pid!));
  const allowed = new Set([...agentPids, ...expectedVmPids]);
  const server = env.temporal.pid();
  const ours = (await processesUnder(env.root)).filter((p) => p.pid !== server);
  for (const { pid, cmd } of ours) if (!allowed.has(pid)) problems.push(`orphan process ${pid}: ${cmd.slice(0, 120)}`);
  const dataPorts = new Set([...env.cluster.agents.values()].map((a) => a.dataPort));
  const listening = await listeningPorts(ours.map((p) => p.pid));
  for (const { pid, port } of listening) if (!dataPorts.has(port)) problems.push(`process ${pid} listens on unexpected port ${port}`);
  for (const host of env.hosts) {
    // Elsewhere than where it runs, a VM's files may stay only as a base for moving it back.
    const vmDir = path.join(env.cluster.home(host), 'vms', vm.vmId);
    if (host !== vm.host && (await exists(vmDir)) && !(await exists(path.join(env.cluster.home(host), 'bases', `${vm.vmId}.json`)))) {
      problems.push(`files of VM ${vm.vmId} left on ${host} (${vmDir}), and no base record for them`);
    }
    const dir = path.join(env.cluster.home(host), 'incoming');
    const shells = (await fs.readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
    for (const s of shells) problems.push(`stale destination shell on ${host}: incoming/${s}`);
  }
  return problems;
}

/** Processes whose command line names a path under `root`. */
export async function processesUnder(root: string): Promise<{ pid: number; cmd: string }[]> {
  const out: { pid: number; cmd: string }[] = [];
  for (const name of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmd = await fs.readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(root)) out.push({ pid: Number(name), cmd: cmd.replaceAll('\0', ' ') });
  }
  return out;
}

async function listeningPorts(pids: number[]): Promise<{ pid: number; port: number }[]> {
  const byInode = new Map<string, number>();
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    const lines = (await fs.readFile(file, 'utf8').catch(() => '')).split('\n').slice(1);
    for (const line of lines) {
      const f = line.trim().split(/\s+/);
      if (f.length > 9 && f[3] === '0A') byInode.set(f[9], parseInt(f[1].split(':')[1], 16));
    }
  }
  const out: { pid: number; port: number }[] = [];
  for (const pid of pids) {
    const fds = await fs.readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      const link = await fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
      const m = /^socket:\[(\d+)\]$/.exec(link);
      if (m && byInode.has(m[1])) out.push({ pid, port: byInode.get(m[1])! });
    }
  }
  return out;
}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}
