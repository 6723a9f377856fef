// The Temporal SDK's process-wide Runtime: its logs go through the agent's pino logger (JSON lines,
// with the activity's workflow and migration fields), and its worker metrics are exported for
// Prometheus on an internal loopback port that the agent's /metrics merges in (worker/metrics.ts).
// Installed once per process, before the first connection.
import { DefaultLogger, Runtime, type LogLevel } from '@temporalio/worker';
import type { Logger } from '../common/log';
import { freePort } from '../scripts/temporal-cli';

const LEVELS: Record<LogLevel, 'trace' | 'debug' | 'info' | 'warn' | 'error'> = { TRACE: 'trace', DEBUG: 'debug', INFO: 'info', WARN: 'warn', ERROR: 'error' };

/** Returns the URL of the SDK's metrics, or null when metrics are off. */
export async function installTemporalRuntime(opts: { log: Logger; metrics: boolean; host: string }): Promise<string | null> {
  const sdkLog = opts.log.child({ component: 'temporal-sdk' });
  const logger = new DefaultLogger('INFO', (entry) => sdkLog[LEVELS[entry.level]](entry.meta ?? {}, entry.message));
  const bindAddress = opts.metrics ? `127.0.0.1:${await freePort()}` : null;
  Runtime.install({
    logger,
    telemetryOptions: {
      logging: { filter: { core: 'WARN', other: 'ERROR' }, forward: {} },
      ...(bindAddress ? { metrics: { prometheus: { bindAddress }, globalTags: { host: opts.host } } } : {}),
    },
  });
  return bindAddress ? `http://${bindAddress}/metrics` : null;
}
