// Soak: one VM under randwrite migrated back and forth N times (TPM there, incremental back), with
// the guest's read check and the agents' memory watched from start to end.
import { promises as fs } from 'node:fs';
import type { VmSpec } from '../hypervisor/driver';
import { vmId as asVmId } from '../common/types';
import { CHAOS_VM, type ChaosEnv } from './env';
import { checkGuest } from './checks';
import { guestWorking } from '../harness/guest-working';

export interface SoakSummary {
  migrations: number;
  failures: number;
  incremental: number;
  violations: number;
  hashesEqual: boolean;
  maxDowntimeMs: number | null;
  totalSeconds: number;
  /** Resident memory of each agent (MiB) at the start and at the end. */
  agentRssMiB: Record<string, { start: number; end: number }>;
}

export async function runSoak(env: ChaosEnv, n: number, log: (line: string) => void): Promise<SoakSummary> {
  const [a, b] = env.hosts;
  const spec: VmSpec = {
    vmId: asVmId(`soak-${Date.now().toString(36)}`),
    ...CHAOS_VM[env.hypervisor],
    workload: 'randwrite',
    seed: 11,
    opsPerSecond: 300,
    fill: true,
  };
  await env.ferry.hostCommand(a, 'vmCreate', spec);
  await guestWorking(env.ferry, a, spec.vmId);
  const rssStart = await agentRss(env);
  const started = Date.now();
  let failures = 0;
  let incremental = 0;
  let violations = 0;
  let maxDowntimeMs: number | null = null;
  let here = a;
  for (let i = 1; i <= n; i++) {
    const there = here === a ? b : a;
    const report = await env.ferry
      .migrate({ vmId: spec.vmId, sourceHost: here, destinationHosts: [there] })
      .then((h) => h.result())
      .catch((err: Error) => err);
    if (report instanceof Error || report.outcome !== 'completed') {
      failures++;
      log(`migration ${i} ${here}→${there}: ${report instanceof Error ? report.message : `${report.outcome}: ${report.reason}`}`);
      if (report instanceof Error || report.outcome !== 'rolled-back') break;
      continue;
    }
    if (report.incremental) incremental++;
    if (report.downtimeMs !== null) maxDowntimeMs = Math.max(maxDowntimeMs ?? 0, report.downtimeMs);
    const s = await env.ferry.hostCommand(there, 'vmInspect', { vmId: spec.vmId });
    violations = s.violations;
    if (i % 10 === 0 || i === n) log(`${i}/${n} migrations, ${incremental} incremental, violations ${violations}, max downtime ${maxDowntimeMs} ms`);
    here = there;
    if (violations > 0) break;
  }
  const guest = await checkGuest(env, here, spec, 300);
  const rssEnd = await agentRss(env);
  await env.ferry.hostCommand(here, 'vmDestroy', { vmId: spec.vmId });
  return {
    migrations: n,
    failures,
    incremental,
    violations: guest.violations,
    hashesEqual: guest.hashesEqual === true,
    maxDowntimeMs,
    totalSeconds: Math.round((Date.now() - started) / 1000),
    agentRssMiB: Object.fromEntries(env.hosts.map((h) => [h, { start: rssStart[h], end: rssEnd[h] }])),
  };
}

async function agentRss(env: ChaosEnv): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [host, agent] of env.cluster.agents) {
    const status = await fs.readFile(`/proc/${agent.process.pid}/status`, 'utf8').catch(() => '');
    const kb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN);
    out[host] = Math.round((kb / 1024) * 10) / 10;
  }
  return out;
}
