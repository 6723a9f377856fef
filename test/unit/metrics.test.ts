import { createAgentMetrics } from '../../worker/metrics';
import { migrationLogFields } from '../../activities/log-context';
import { errorReason } from '../../dataplane';
import { Msg } from '../../migration/messages';

const identity = { migrationId: 'm', epoch: 1, vmId: 'vm', stream: 'disk' };

async function sample(metrics: ReturnType<typeof createAgentMetrics>, name: string, labels: Record<string, string> = {}): Promise<number> {
  const metric = await metrics.registry.getSingleMetric(name)!.get();
  const values = metric.values.filter((v) => Object.entries(labels).every(([k, x]) => v.labels[k] === x));
  return values.reduce((sum, v) => sum + v.value, 0);
}

describe('agent metrics', () => {
  it('counts the end of a migration once per migration and role, however often the activity runs', async () => {
    const metrics = createAgentMetrics('h');
    for (let i = 0; i < 3; i++) metrics.migrationEnded({ migrationId: 'm1', role: 'source', outcome: 'completed', durationSeconds: 10 });
    metrics.migrationEnded({ migrationId: 'm1', role: 'destination', outcome: 'completed', downtimeSeconds: 0.05, onDemandFetches: 4 });
    metrics.migrationEnded({ migrationId: 'm2', role: 'source', outcome: 'failed', durationSeconds: 1 });
    expect(await sample(metrics, 'ferry_migrations_total', { role: 'source', outcome: 'completed' })).toBe(1);
    expect(await sample(metrics, 'ferry_migrations_total', { role: 'destination', outcome: 'completed' })).toBe(1);
    expect(await sample(metrics, 'ferry_migrations_total', { role: 'source', outcome: 'failed' })).toBe(1);
    expect(await sample(metrics, 'ferry_migrations_total', { role: 'source', outcome: 'rolled-back' })).toBe(0);
    expect(await sample(metrics, 'ferry_ondemand_fetches_total')).toBe(4);
    expect(await sample(metrics, 'ferry_migration_duration_seconds', { outcome: 'completed' })).toBeGreaterThan(0);
  });

  it('labels data-plane bytes by what they carry and errors by reason', async () => {
    const metrics = createAgentMetrics('h');
    const client = metrics.dataPlane('client');
    client.sent!(identity, Msg.Block, 65536);
    client.sent!(identity, Msg.State, 4096);
    client.sent!(identity, Msg.Final, 100);
    client.sent!(identity, Msg.Query, 0);
    client.error!('bad_checksum');
    metrics.dataPlane('server').error!('auth_failed');
    expect(await sample(metrics, 'ferry_dataplane_sent_bytes_total', { kind: 'disk' })).toBe(65536);
    expect(await sample(metrics, 'ferry_dataplane_sent_bytes_total', { kind: 'memory' })).toBe(4096);
    expect(await sample(metrics, 'ferry_dataplane_sent_bytes_total', { kind: 'control' })).toBe(100);
    expect(await sample(metrics, 'ferry_dataplane_errors_total', { side: 'client', reason: 'crc' })).toBe(1);
    expect(await sample(metrics, 'ferry_dataplane_errors_total', { side: 'server', reason: 'auth' })).toBe(1);
  });

  it('maps data-plane error codes to the operator\'s reasons', () => {
    expect(['auth_failed', 'bad_checksum', 'corrupt_frame', 'refused', 'connect_failed', 'timeout', 'disconnected', 'bad_tag', 'protocol'].map(errorReason)).toEqual([
      'auth', 'crc', 'crc', 'refused', 'connection', 'connection', 'connection', 'protocol', 'protocol',
    ]);
  });
});

describe('migration log fields', () => {
  it('come from the activity input or its MigrationRef, and are absent otherwise', () => {
    expect(migrationLogFields([{ ref: { migrationId: 'm', vmId: 'v', epoch: 2 }, full: true }])).toEqual({ migrationId: 'm', vmId: 'v' });
    expect(migrationLogFields([{ migrationId: 'm', vmId: 'v', ref: null }])).toEqual({ migrationId: 'm', vmId: 'v' });
    expect(migrationLogFields([{ vmId: 'v', diskBytes: 1 }])).toEqual({ vmId: 'v' });
    expect(migrationLogFields([])).toEqual({});
  });
});
