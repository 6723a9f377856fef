// Prometheus metrics of a host agent. One registry per agent, built here and handed to the pieces that
// record: the activities (outcomes, durations, downtime, on-demand fetches, as the host learns them)
// and the data plane (bytes and errors). Workflows never record: they replay.
// `/metrics` serves this registry followed by the Temporal SDK's own worker metrics, which the SDK's
// Runtime exports on an internal loopback port: one scrape target per agent.
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { errorReason, type DataPlaneObserver } from '../dataplane/api';
import { Msg } from '../migration/messages';
import type { Logger } from '../common/log';

export type MigrationRole = 'source' | 'destination';
export type MigrationOutcome = 'completed' | 'rolled-back' | 'failed';

export interface MigrationEnd {
  migrationId: string;
  role: MigrationRole;
  outcome: MigrationOutcome;
  /** From the workflow's start to now (the source observes it). */
  durationSeconds?: number;
  /** Guest-observed downtime (the destination observes it). */
  downtimeSeconds?: number | null;
  onDemandFetches?: number;
}

export interface AgentMetrics {
  readonly registry: Registry;
  /** Record the end of a migration on this host, once per migration and role (activity retries do not count twice). */
  migrationEnded(end: MigrationEnd): void;
  /** Counts bytes and errors of the data plane; the client is the sending (source) side. */
  dataPlane(side: 'client' | 'server'): DataPlaneObserver;
}

/** What a data-plane message carries, by its migration message type (migration/messages.ts). */
function payloadKind(type: number): 'disk' | 'memory' | 'control' {
  if (type === Msg.Block) return 'disk';
  if (type === Msg.State) return 'memory'; // the hypervisor's machine-state stream: memory and device state
  return 'control';
}

const REMEMBERED_ENDS = 10_000;

export function createAgentMetrics(host: string): AgentMetrics {
  const registry = new Registry();
  registry.setDefaultLabels({ host });
  collectDefaultMetrics({ register: registry });
  const registers = [registry];

  const migrations = new Counter({
    name: 'ferry_migrations_total',
    help: 'Migrations that ended on this host, by role and outcome (a destination counts each attempt made on it)',
    labelNames: ['role', 'outcome'],
    registers,
  });
  const duration = new Histogram({
    name: 'ferry_migration_duration_seconds',
    help: 'Total migration time, from the start of the workflow to its end on the source',
    labelNames: ['outcome'],
    buckets: [1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600],
    registers,
  });
  const downtime = new Histogram({
    name: 'ferry_migration_downtime_seconds',
    help: 'Guest-observed downtime of completed migrations (the guest\'s first heartbeat on the destination minus its last on the source)',
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers,
  });
  const fetches = new Counter({
    name: 'ferry_ondemand_fetches_total',
    help: 'Postcopy reads of stale blocks that the destination fetched from the source ahead of the push',
    registers,
  });
  const sent = new Counter({
    name: 'ferry_dataplane_sent_bytes_total',
    help: 'Payload bytes this host put on the data plane (all-zero payloads travel as a flag and count 0; resends count again)',
    labelNames: ['kind'],
    registers,
  });
  const received = new Counter({
    name: 'ferry_dataplane_received_bytes_total',
    help: 'Payload bytes this host received on the data plane',
    labelNames: ['kind'],
    registers,
  });
  const errors = new Counter({
    name: 'ferry_dataplane_errors_total',
    help: 'Data-plane connection and handshake failures, by side and reason (auth, crc, protocol, connection, refused)',
    labelNames: ['side', 'reason'],
    registers,
  });
  // Pre-create the series, so that dashboards and rate() see 0 rather than nothing.
  for (const kind of ['disk', 'memory', 'control']) {
    sent.inc({ kind }, 0);
    received.inc({ kind }, 0);
  }
  for (const role of ['source', 'destination']) for (const outcome of ['completed', 'rolled-back', 'failed']) migrations.inc({ role, outcome }, 0);

  const ended = new Set<string>();

  return {
    registry,
    migrationEnded(end) {
      const key = `${end.role} ${end.migrationId}`;
      if (ended.has(key)) return;
      ended.add(key);
      if (ended.size > REMEMBERED_ENDS) ended.delete(ended.values().next().value as string);
      migrations.inc({ role: end.role, outcome: end.outcome });
      if (end.durationSeconds !== undefined) duration.observe({ outcome: end.outcome }, end.durationSeconds);
      if (end.downtimeSeconds !== undefined && end.downtimeSeconds !== null) downtime.observe(end.downtimeSeconds);
      if (end.onDemandFetches) fetches.inc(end.onDemandFetches);
    },
    dataPlane(side) {
      return {
        sent: (_identity, type, bytes) => sent.inc({ kind: payloadKind(type) }, bytes),
        received: (_identity, type, bytes) => received.inc({ kind: payloadKind(type) }, bytes),
        error: (code) => errors.inc({ side, reason: errorReason(code) }),
      };
    },
  };
}

export interface MetricsServer {
  port: number;
  close(): Promise<void>;
}

/**
 * Serve GET /metrics: the agent's registry, then the Temporal SDK's metrics fetched from
 * `temporalMetricsUrl` (their names start with temporal_, so the two never collide).
 */
export async function serveMetrics(opts: { port: number; host?: string; metrics: AgentMetrics; temporalMetricsUrl: string | null; log: Logger }): Promise<MetricsServer> {
  const { registry } = opts.metrics;
  const server = http.createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('Ferry agent: metrics are at /metrics\n');
      return;
    }
    void Promise.all([registry.metrics(), temporalMetrics(opts.temporalMetricsUrl, opts.log)]).then(
      ([own, temporal]) => res.writeHead(200, { 'content-type': registry.contentType }).end(`${own}\n${temporal}`),
      (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`cannot collect metrics: ${err.message}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host ?? '0.0.0.0', () => {
      server.off('error', reject);
      resolve();
    });
  }).catch((err: Error) => {
    throw new Error(`cannot serve metrics on ${opts.host ?? '0.0.0.0'}:${opts.port}: ${err.message} (choose another --metrics-listen)`);
  });
  return {
    port: (server.address() as AddressInfo).port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

async function temporalMetrics(url: string | null, log: Logger): Promise<string> {
  if (!url) return '';
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(5000) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    return await res.text();
  } catch (err) {
    log.warn({ url, err: (err as Error).message }, 'Temporal SDK metrics unavailable; serving Ferry metrics only');
    return '';
  }
}
