// QEMU's migration stream (memory and device state) as Ferry's OutgoingStream / IncomingStream: the
// source QEMU migrates to a Unix socket the agent owns, with `pause-before-switchover`; the
// destination QEMU (started with `-incoming defer -S`) loads from a socket the agent connects to.
import type { IncomingStream, OutgoingStream, StreamLimits, StreamProgress, StreamStatus } from '../driver';
import { HypervisorError } from '../errors';
import { connectToStream, listenForStream, socketChunks, streamMilestones, streamSocketPath } from '../stream-socket';
import type { QmpClient as Qmp } from './qmp/client';

const CONNECT_MS = 10_000;
/** QEMU's max-bandwidth when Ferry's data plane sets no limit: the data plane's backpressure paces it. */
const UNLIMITED_BYTES_PER_SECOND = 64 * 1024 ** 3;

interface QueryMigrate {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  'cpu-throttle-percentage'?: number;
  'error-desc'?: string;
  ram?: { transferred: number; remaining: number; total: number; 'dirty-sync-count': number; 'dirty-pages-rate': number; 'page-size': number };
}

function toStatus(s: string | undefined): StreamStatus {
  switch (s) {
    case 'pre-switchover':
      return 'ready';
    case 'device':
      return 'completing';
    case 'completed':
    case 'failed':
    case 'cancelled':
    case 'setup':
      return s;
    case 'cancelling':
      return 'cancelled';
    default:
      return 'active';
  }
}

async function progress(qmp: Qmp): Promise<StreamProgress> {
  const q = await qmp.execute<QueryMigrate>('query-migrate');
  const ram = q.ram;
  const status = toStatus(q.status);
  return {
    status,
    transferredBytes: ram?.transferred ?? 0,
    remainingBytes: ram?.remaining ?? 0,
    totalBytes: ram?.total ?? 0,
    // dirty-sync-count counts bitmap syncs: the first one starts the first pass.
    iterations: Math.max(0, (ram?.['dirty-sync-count'] ?? 1) - 1),
    expectedDowntimeMs: q['expected-downtime'] ?? null,
    dirtyBytesPerSecond: (ram?.['dirty-pages-rate'] ?? 0) * (ram?.['page-size'] ?? 4096),
    throttle: (q['cpu-throttle-percentage'] ?? 0) / 100,
    downtimeMs: q.downtime ?? null,
    ...(q['error-desc'] ? { error: q['error-desc'] } : {}),
  };
}

function parameters(limits: Partial<StreamLimits>): Record<string, unknown> {
  const p: Record<string, unknown> = {};
  if (limits.downtimeLimitMs !== undefined) p['downtime-limit'] = Math.max(0, Math.round(limits.downtimeLimitMs));
  if (limits.bandwidthBytesPerSecond !== undefined) p['max-bandwidth'] = Math.round(limits.bandwidthBytesPerSecond ?? UNLIMITED_BYTES_PER_SECOND);
  return p;
}

/** MIGRATION events of the next stream: `ready` at pre-switchover, `completed` at its end. */
function watch(qmp: Qmp): { ready: Promise<void>; done: Promise<void>; stop(): void } {
  const { ready, done, reachReady: onReady, finish: onDone, fail: onFail } = streamMilestones();
  const off = qmp.on('MIGRATION', (data) => {
    const status = String(data.status);
    if (status === 'pre-switchover') onReady();
    else if (status === 'completed') onDone();
    else if (status === 'failed' || status === 'cancelled') {
      progress(qmp).then(
        (p) => onFail(new HypervisorError('MigrationFailed', `QEMU's migration stream ${status}${p.error ? `: ${p.error}` : ''}`)),
        () => onFail(new HypervisorError('MigrationFailed', `QEMU's migration stream ${status}`)),
      );
    }
  });
  const closed = setInterval(() => {
    if (qmp.closed) onFail(new HypervisorError('VmNotRunning', 'the QEMU process went away during the migration stream'));
  }, 200);
  done.finally(() => {
    off();
    clearInterval(closed);
  }).catch(() => undefined);
  return {
    ready,
    done,
    stop: () => {
      off();
      clearInterval(closed);
    },
  };
}

export async function migrateOut(qmp: Qmp, vmId: string, limits: StreamLimits): Promise<OutgoingStream> {
  const listener = await listenForStream(`${vmId}-out`);
  try {
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'pause-before-switchover', state: true },
        { capability: 'auto-converge', state: limits.autoConverge },
      ],
    });
    await qmp.execute('migrate-set-parameters', parameters(limits));
    const events = watch(qmp);
    await qmp.execute('migrate', { uri: `unix:${listener.path}` });
    const socket = await listener.accepted(CONNECT_MS);
    const completed = events.done.then(() => progress(qmp)).finally(() => void listener.close());
    completed.catch(() => undefined);
    return {
      chunks: socketChunks(socket),
      ready: events.ready,
      completed,
      continue: async () => void (await qmp.execute('migrate-continue', { state: 'pre-switchover' })),
      setLimits: async (l) => void (await qmp.execute('migrate-set-parameters', parameters(l))),
      progress: () => progress(qmp),
      cancel: async () => {
        if (!qmp.closed) await qmp.execute('migrate_cancel');
      },
    };
  } catch (err) {
    await listener.close();
    throw err;
  }
}

/** How long a cancelled outgoing stream may take to end. */
const CANCEL_MS = 10_000;

/**
 * An outgoing stream nothing reads any more (its agent died, or lost its QMP connection) holds QEMU in
 * its migration: at pre-switchover the guest stays paused, `cont` is refused ("Migration is not
 * finalized yet") and so is a new `migrate`. Cancelling it ends the migration and QEMU runs the guest
 * again if it ran before; Ferry's next switchover starts a stream of its own.
 */
export async function cancelOrphanStream(qmp: Qmp, vmId: string): Promise<void> {
  const done = (st: string | undefined) => st === undefined || ['none', 'completed', 'failed', 'cancelled'].includes(st);
  const query = async () => (await qmp.execute<QueryMigrate>('query-migrate')).status;
  if (done(await query())) return;
  await qmp.execute('migrate_cancel');
  const until = Date.now() + CANCEL_MS;
  for (let st = await query(); !done(st); st = await query()) {
    if (Date.now() > until) throw new HypervisorError('Timeout', `VM ${vmId}'s outgoing migration stream is still ${st} ${CANCEL_MS / 1000} s after migrate_cancel`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function migrateIn(qmp: Qmp, vmId: string): Promise<IncomingStream> {
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  const path = await streamSocketPath(`${vmId}-in`);
  const events = watch(qmp);
  await qmp.execute('migrate-incoming', { uri: `unix:${path}` });
  const writer = await connectToStream(path, CONNECT_MS);
  return {
    write: (chunk) => writer.write(chunk),
    completed: events.done,
    close: () => {
      events.stop();
      writer.close();
    },
  };
}
