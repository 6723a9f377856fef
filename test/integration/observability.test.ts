// Operators' view of real agents: Prometheus metrics scraped over HTTP after real migrations, and the
// structured logs the agents wrote while doing them.
import { promises as fs } from 'node:fs';
import { useCluster, testVm, uniqueHosts, waitForProgress } from '../support/cluster';
import { connect } from '../../dataplane';

const [a, b] = uniqueHosts('obs-a', 'obs-b');
jest.setTimeout(300_000);

const t = useCluster([a, b], undefined, { metrics: true });

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

async function scrape(host: string): Promise<{ text: string; samples: Sample[] }> {
  const port = t.cluster.agents.get(host)!.metricsPort;
  expect(port).toEqual(expect.any(Number));
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
  const text = await res.text();
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const [, k, v] of (m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return { text, samples };
}

/** The value of the one sample with this name whose labels include `labels` (0 when there is none). */
function value(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  const found = samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  expect(found.length).toBeLessThanOrEqual(1);
  return found[0]?.value ?? 0;
}

async function logLines(host: string): Promise<{ raw: string; entry: Record<string, unknown> }[]> {
  const text = await fs.readFile(t.cluster.logFile(host), 'utf8');
  return text
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((raw) => ({ raw, entry: JSON.parse(raw) as Record<string, unknown> }));
}

describe('an agent with --metrics-port', () => {
  const vm = testVm('randwrite', { opsPerSecond: 200 });

  it('counts a completed migration on both hosts: outcome, bytes, downtime, duration; Temporal metrics too', async () => {
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    const report = await (await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] })).result();
    expect(report.outcome).toBe('completed');

    const src = (await scrape(a)).samples;
    const dst = await scrape(b);
    expect(value(src, 'ferry_migrations_total', { role: 'source', outcome: 'completed', host: a })).toBe(1);
    expect(value(dst.samples, 'ferry_migrations_total', { role: 'destination', outcome: 'completed', host: b })).toBe(1);
    expect(value(src, 'ferry_migrations_total', { role: 'source', outcome: 'rolled-back' })).toBe(0);

    // The disk is filled (no all-zero block): the whole of it crossed the wire, and what one side sent the other received.
    const diskSent = value(src, 'ferry_dataplane_sent_bytes_total', { kind: 'disk' });
    expect(diskSent).toBeGreaterThanOrEqual(vm.diskBytes);
    expect(value(dst.samples, 'ferry_dataplane_received_bytes_total', { kind: 'disk' })).toBe(diskSent);
    const memorySent = value(src, 'ferry_dataplane_sent_bytes_total', { kind: 'memory' });
    expect(memorySent).toBeGreaterThan(0);
    expect(value(dst.samples, 'ferry_dataplane_received_bytes_total', { kind: 'memory' })).toBe(memorySent);
    expect(value(src, 'ferry_dataplane_sent_bytes_total', { kind: 'control' })).toBeGreaterThan(0); // the stale bitmap and the requests

    expect(value(dst.samples, 'ferry_migration_downtime_seconds_count')).toBe(1);
    expect(value(dst.samples, 'ferry_migration_downtime_seconds_sum')).toBeCloseTo((report.downtimeMs ?? NaN) / 1000, 2);
    expect(value(src, 'ferry_migration_duration_seconds_count', { outcome: 'completed' })).toBe(1);
    const seconds = value(src, 'ferry_migration_duration_seconds_sum', { outcome: 'completed' });
    expect(seconds).toBeGreaterThan(0);
    expect(seconds).toBeLessThan(report.totalMs / 1000 + 60);
    expect(value(dst.samples, 'ferry_ondemand_fetches_total')).toBe(report.onDemandFetches);

    // Default process metrics and the Temporal SDK's worker metrics, from the same scrape target.
    expect(value(src, 'process_cpu_user_seconds_total')).toBeGreaterThan(0);
    expect(dst.text).toMatch(/^temporal_\w+/m);
    expect(src.some((s) => s.name.startsWith('temporal_activity_execution_latency') && s.labels.activity_type === 'copyDiskFirstPass')).toBe(true);
  });

  it('puts the migration id and the VM id on every log line about the migration, as JSON', async () => {
    const lines = [...(await logLines(a)), ...(await logLines(b))];
    const about = lines.filter((l) => l.raw.includes(`migrate-${vm.vmId}-`));
    expect(about.length).toBeGreaterThan(5);
    for (const { entry } of about) {
      expect(entry).toMatchObject({ migrationId: expect.stringMatching(new RegExp(`^migrate-${vm.vmId}-`)), vmId: vm.vmId });
    }
    const messages = about.map((l) => l.entry.msg);
    expect(messages).toEqual(expect.arrayContaining(['incoming VM prepared', 'switchover committed', 'committed: VM resumed on this host', 'data-plane session accepted']));
    // Temporal's own log lines are JSON through the same logger.
    expect(lines.some((l) => l.entry.component === 'temporal-sdk')).toBe(true);
  });

  it('counts a rolled-back and a failed migration, and a data-plane authentication failure', async () => {
    const vm2 = testVm('randwrite', { opsPerSecond: 200 });
    await t.ferry.hostCommand(a, 'vmCreate', vm2);
    const handle = await t.ferry.migrate({ vmId: vm2.vmId, sourceHost: a, destinationHosts: [b], cutover: 'manual' });
    await waitForProgress(handle, 'awaiting-cutover', (p) => p.phase === 'awaiting-cutover');
    await handle.abort('testing the metrics');
    expect((await handle.result()).outcome).toBe('rolled-back');

    const missing = await t.ferry.migrate({ vmId: `${vm2.vmId}-missing`, sourceHost: a, destinationHosts: [b] });
    await expect(missing.result()).rejects.toThrow();

    const wrongSecret = connect({
      address: t.cluster.agents.get(b)!.dataAddress,
      secret: Buffer.from('not the cluster secret'),
      identity: { migrationId: 'intruder', epoch: 1, vmId: vm2.vmId, stream: 'disk' },
    });
    await expect(wrongSecret).rejects.toThrow(/secret/);

    const src = (await scrape(a)).samples;
    const dst = (await scrape(b)).samples;
    expect(value(src, 'ferry_migrations_total', { role: 'source', outcome: 'completed' })).toBe(1);
    expect(value(src, 'ferry_migrations_total', { role: 'source', outcome: 'rolled-back' })).toBe(1);
    expect(value(src, 'ferry_migrations_total', { role: 'source', outcome: 'failed' })).toBe(1);
    expect(value(src, 'ferry_migration_duration_seconds_count', { outcome: 'rolled-back' })).toBe(1);
    expect(value(dst, 'ferry_migrations_total', { role: 'destination', outcome: 'rolled-back' })).toBe(1);
    expect(value(dst, 'ferry_dataplane_errors_total', { side: 'server', reason: 'auth' })).toBe(1);
    expect(value(dst, 'ferry_migration_downtime_seconds_count')).toBe(1);
  });
});
