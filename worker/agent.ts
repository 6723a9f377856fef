// The per-host agent: a Temporal worker for the host's queue (activities), a workflow worker on the
// shared queue, the data-plane endpoint, and the hypervisor driver for the VMs under its home.
import { NativeConnection, Worker } from '@temporalio/worker';
import { promises as fs } from 'node:fs';
import { createActivities } from '../activities';
import { createControlActivities } from '../activities/control';
import { listen } from '../dataplane';
import { SimDriver } from '../hypervisor';
import { MIGRATION_TASK_QUEUE, hostTaskQueue } from '../common/types';
import { createLogger, type Logger } from '../common/log';
import { Destination } from '../migration/destination';
import { OwnershipStore } from '../migration/ownership';
import { Source } from '../migration/source';
import type { AgentConfig } from './config';

export interface RunningAgent {
  host: string;
  dataAddress: string;
  log: Logger;
  /** Resolves when the workers stop; rejects if one fails. */
  done: Promise<void>;
  shutdown(): Promise<void>;
}

export async function startAgent(config: AgentConfig, log: Logger = createLogger({ host: config.host })): Promise<RunningAgent> {
  await fs.mkdir(config.home, { recursive: true });
  const driver = new SimDriver({ home: config.home });
  const ownership = new OwnershipStore(config.home);
  const destination = new Destination({ driver, ownership, home: config.home, log });
  await destination.recover();
  const source = new Source({ driver, ownership, secret: config.dataSecret, tls: config.dataTls, log, home: config.home });

  const server = await listen({
    host: config.dataListenHost,
    port: config.dataListenPort,
    secret: config.dataSecret,
    tls: config.dataTls,
    accept: (identity) => destination.accept(identity),
    log: (level, msg, fields) => log[level](fields ?? {}, msg),
  });
  const dataAddress = config.dataAdvertise ?? `${config.dataListenHost}:${server.port}`;

  const connection = await NativeConnection.connect({ address: config.temporal.address, tls: config.temporal.tls, apiKey: config.temporal.apiKey });
  const activities = createActivities({ host: config.host, home: config.home, dataAddress, driver, ownership, source, destination, log, limits: config.limits });
  const hostWorker = await Worker.create({
    connection,
    namespace: config.temporal.namespace,
    taskQueue: hostTaskQueue(config.host),
    activities,
    maxConcurrentActivityTaskExecutions: 64,
  });
  const workflowWorker = await Worker.create({
    connection,
    namespace: config.temporal.namespace,
    taskQueue: MIGRATION_TASK_QUEUE,
    activities: createControlActivities(),
    ...(config.workflowBundlePath
      ? { workflowBundle: { codePath: config.workflowBundlePath } }
      : { workflowsPath: require.resolve('../workflows') }),
  });

  const done = Promise.all([hostWorker.run(), workflowWorker.run()]).then(() => undefined);
  log.info({ host: config.host, taskQueue: hostTaskQueue(config.host), dataAddress, home: config.home, pid: process.pid }, 'agent ready');

  let stopping: Promise<void> | null = null;
  return {
    host: config.host,
    dataAddress,
    log,
    done,
    shutdown() {
      stopping ??= (async () => {
        hostWorker.shutdown();
        workflowWorker.shutdown();
        await done.catch(() => undefined);
        await server.close();
        await connection.close();
      })();
      return stopping;
    },
  };
}
