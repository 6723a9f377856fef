// The per-host agent: a Temporal worker for the host's queue (activities), a workflow worker on the
// shared queue, the data-plane endpoint, and the hypervisor driver for the VMs under its home.
import { NativeConnection, Worker } from '@temporalio/worker';
import { Client } from '@temporalio/client';
import { promises as fs } from 'node:fs';
import { createActivities } from '../activities';
import { createControlActivities } from '../activities/control';
import { listen } from '../dataplane';
import { createDriver } from '../hypervisor';
import os from 'node:os';
import { agentIdentity, hostTaskQueue } from '../common/types';
import { createLogger, withLogContext, type Logger } from '../common/log';
import { Destination } from '../migration/destination';
import { OwnershipStore } from '../migration/ownership';
import { Source } from '../migration/source';
import type { AgentConfig } from './config';
import { createAgentMetrics, serveMetrics, type AgentMetrics, type MetricsServer } from './metrics';
import { logContextInterceptor } from '../activities/log-context';
import { failureInterceptor } from '../activities/failures';
import { Reconciler } from './reconcile';

export interface RunningAgent {
  host: string;
  dataAddress: string;
  /** Port of /metrics, or null when metrics are off. */
  metricsPort: number | null;
  metrics: AgentMetrics;
  log: Logger;
  /** Resolves when the workers stop; rejects if one fails. */
  done: Promise<void>;
  shutdown(): Promise<void>;
}

export interface AgentOptions {
  log?: Logger;
  /** Where the Temporal SDK's Runtime exports its metrics (worker/runtime.ts), merged into /metrics. */
  temporalMetricsUrl?: string | null;
}

export async function startAgent(config: AgentConfig, opts: AgentOptions = {}): Promise<RunningAgent> {
  const log = opts.log ?? createLogger({ host: config.host });
  const metrics = createAgentMetrics(config.host);
  await fs.mkdir(config.home, { recursive: true });
  const driver = await createDriver(config.hypervisor, config.home, log);
  const ownership = new OwnershipStore(config.home);
  const destination = new Destination({ host: config.host, driver, ownership, home: config.home, log });
  const source = new Source({ host: config.host, driver, ownership, secret: config.dataSecret, tls: config.dataTls, log, home: config.home, observer: metrics.dataPlane('client') });

  // Before anything here is served or resumed: a copy an operator declared lost must never run again.
  const connection = await NativeConnection.connect({ address: config.temporal.address, tls: config.temporal.tls, apiKey: config.temporal.apiKey });
  const client = new Client({ connection, namespace: config.temporal.namespace });
  const reconciler = new Reconciler({ host: config.host, home: config.home, client, destination, source, log });
  await reconciler.start(config.reconcileSeconds * 1000);

  const server = await listen({
    host: config.dataListenHost,
    port: config.dataListenPort,
    secret: config.dataSecret,
    tls: config.dataTls,
    accept: async (identity) => {
      // Every line logged while applying this session's messages names its migration and VM.
      const handler = await destination.accept(identity);
      const fields = { migrationId: identity.migrationId, vmId: identity.vmId };
      return {
        onMessage: (session, msg) => withLogContext(fields, () => handler.onMessage(session, msg)),
        onClose: handler.onClose && ((session) => withLogContext(fields, () => handler.onClose!(session))),
      };
    },
    observer: metrics.dataPlane('server'),
    log: (level, msg, fields) => log[level](fields ?? {}, msg),
  });
  const dataAddress = config.dataAdvertise ?? `${config.dataListenHost}:${server.port}`;

  const activities = createActivities({ host: config.host, home: config.home, dataAddress, driver, ownership, source, destination, log, metrics, limits: config.limits, taskQueue: config.taskQueue });
  const identity = agentIdentity(config.host, process.pid, os.hostname());
  const hostWorker = await Worker.create({
    connection,
    identity,
    namespace: config.temporal.namespace,
    taskQueue: hostTaskQueue(config.host),
    activities,
    interceptors: { activity: [logContextInterceptor, failureInterceptor({ host: config.host, log })] },
    maxConcurrentActivityTaskExecutions: 64,
    // Heartbeats carry the transfers' progress and rate samples: let them reach the server every second.
    maxHeartbeatThrottleInterval: '1 second',
  });
  const workflowWorker = await Worker.create({
    connection,
    identity,
    namespace: config.temporal.namespace,
    taskQueue: config.taskQueue,
    activities: createControlActivities(),
    ...(config.workflowBundlePath
      ? { workflowBundle: { codePath: config.workflowBundlePath } }
      : { workflowsPath: require.resolve('../workflows') }),
  });

  let metricsServer: MetricsServer | null = null;
  if (config.metricsListen !== null) {
    metricsServer = await serveMetrics({ ...config.metricsListen, metrics, temporalMetricsUrl: opts.temporalMetricsUrl ?? null, log });
  }
  const metricsPort = metricsServer?.port ?? null;

  const done = Promise.all([hostWorker.run(), workflowWorker.run()]).then(() => undefined);
  log.info({ taskQueue: hostTaskQueue(config.host), workflowTaskQueue: config.taskQueue, dataAddress, metricsPort, home: config.home, pid: process.pid, hypervisor: await driver.describe() }, 'agent ready');

  let stopping: Promise<void> | null = null;
  return {
    host: config.host,
    dataAddress,
    metricsPort,
    metrics,
    log,
    done,
    shutdown() {
      stopping ??= (async () => {
        hostWorker.shutdown();
        workflowWorker.shutdown();
        await done.catch(() => undefined);
        await reconciler.stop();
        await server.close();
        await metricsServer?.close();
        await connection.close();
      })();
      return stopping;
    },
  };
}
