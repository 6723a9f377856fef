// Host agent configuration: flags first, then the environment, validated with clear errors.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { DEFAULT_TASK_QUEUE, hostName } from '../common/types';
import { DRIVER_KINDS, type DriverKind } from '../hypervisor';

export interface TemporalConnectionConfig {
  address: string;
  namespace: string;
  apiKey?: string;
  /** The shape both Connection.connect and NativeConnection.connect take. */
  tls?: { serverNameOverride?: string; serverRootCACertificate?: Buffer; clientCertPair?: { crt: Buffer; key: Buffer } };
}

export interface AgentConfig {
  host: string;
  home: string;
  dataListenHost: string;
  dataListenPort: number;
  /** Address the other hosts use to reach this data plane (defaults to the listen address). */
  dataAdvertise: string | null;
  dataSecret: Buffer;
  dataTls?: { cert: Buffer; key: Buffer; ca?: Buffer };
  temporal: TemporalConnectionConfig;
  /** The task queue of this deployment's workflows, shared by all its agents and clients. */
  taskQueue: string;
  /** Where /metrics is served; null: metrics are off. */
  metricsListen: { host: string; port: number } | null;
  /** Migrations that may run at once touching this host (as source or destination), and cluster-wide. */
  limits: { host: number; cluster: number };
  /** How often the agent reconciles its shells and leftovers with Temporal (worker/reconcile.ts). */
  reconcileSeconds: number;
  /** A prebuilt workflow bundle (jest and the demo build it once for all agents). */
  workflowBundlePath: string | null;
  /** The hypervisor driver of this host's VMs. */
  hypervisor: DriverKind;
}

export interface AgentFlags {
  host?: string;
  home?: string;
  dataListen?: string;
  dataAdvertise?: string;
  dataSecretFile?: string;
  dataTlsCert?: string;
  dataTlsKey?: string;
  dataTlsCa?: string;
  temporalAddress?: string;
  namespace?: string;
  taskQueue?: string;
  apiKey?: string;
  tls?: boolean;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsServerName?: string;
  metricsListen?: string;
  metricsPort?: string;
  maxMigrations?: string;
  clusterMaxMigrations?: string;
  hypervisor?: string;
  reconcileSeconds?: string;
}

export class ConfigError extends Error {}

const listenSchema = z
  .string()
  .regex(/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'expected HOST:PORT, for example 127.0.0.1:7400 (port 0 picks a free port)');

function readSecret(file: string | undefined, env: NodeJS.ProcessEnv): Buffer {
  if (file ?? env.FERRY_DATA_SECRET_FILE) {
    const f = (file ?? env.FERRY_DATA_SECRET_FILE)!;
    try {
      return Buffer.from(readFileSync(f, 'utf8').trim());
    } catch (err) {
      throw new ConfigError(`cannot read the data-plane secret file ${f}: ${(err as Error).message}`);
    }
  }
  if (env.FERRY_DATA_SECRET) return Buffer.from(env.FERRY_DATA_SECRET);
  throw new ConfigError(
    'no data-plane secret: set FERRY_DATA_SECRET, or FERRY_DATA_SECRET_FILE / --data-secret-file to a file holding it (the same secret on every host)',
  );
}

function readOptional(file: string | undefined, what: string): Buffer | undefined {
  if (!file) return undefined;
  try {
    return readFileSync(file);
  } catch (err) {
    throw new ConfigError(`cannot read ${what} ${file}: ${(err as Error).message}`);
  }
}

export function loadAgentConfig(flags: AgentFlags, env: NodeJS.ProcessEnv = process.env): AgentConfig {
  const host = flags.host ?? env.FERRY_HOST;
  if (!host) throw new ConfigError('no host name: pass --host NAME (or set FERRY_HOST); the agent serves the task queue host-NAME');
  try {
    hostName(host);
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }
  const home = path.resolve(flags.home ?? env.FERRY_HOME ?? path.join(process.cwd(), '.ferry', host));
  const listen = flags.dataListen ?? env.FERRY_DATA_LISTEN ?? '127.0.0.1:0';
  const data = parseListen(listen, '--data-listen');

  const dataTlsCert = flags.dataTlsCert ?? env.FERRY_DATA_TLS_CERT;
  const dataTlsKey = flags.dataTlsKey ?? env.FERRY_DATA_TLS_KEY;
  if (Boolean(dataTlsCert) !== Boolean(dataTlsKey)) throw new ConfigError('data-plane TLS needs both --data-tls-cert and --data-tls-key');

  const tlsCert = flags.tlsCert ?? env.TEMPORAL_TLS_CLIENT_CERT_PATH;
  const tlsKey = flags.tlsKey ?? env.TEMPORAL_TLS_CLIENT_KEY_PATH;
  const tlsCa = flags.tlsCa ?? env.TEMPORAL_TLS_SERVER_CA_CERT_PATH;
  const wantTls = flags.tls || env.TEMPORAL_TLS === 'true' || Boolean(tlsCert || tlsCa);
  if (Boolean(tlsCert) !== Boolean(tlsKey)) throw new ConfigError('Temporal mTLS needs both --tls-cert and --tls-key');

  const metricsListen = metricsAddress(flags, env);

  const limits = {
    host: positiveInt(flags.maxMigrations ?? env.FERRY_MAX_MIGRATIONS, 4, '--max-migrations'),
    cluster: positiveInt(flags.clusterMaxMigrations ?? env.FERRY_CLUSTER_MAX_MIGRATIONS, 32, '--cluster-max-migrations'),
  };

  return {
    host,
    home,
    dataListenHost: data.host,
    dataListenPort: data.port,
    dataAdvertise: flags.dataAdvertise ?? env.FERRY_DATA_ADVERTISE ?? null,
    dataSecret: readSecret(flags.dataSecretFile, env),
    dataTls: dataTlsCert ? { cert: readOptional(dataTlsCert, 'the data-plane certificate')!, key: readOptional(dataTlsKey, 'the data-plane key')!, ca: readOptional(flags.dataTlsCa ?? env.FERRY_DATA_TLS_CA, 'the data-plane CA') } : undefined,
    temporal: {
      address: flags.temporalAddress ?? env.TEMPORAL_ADDRESS ?? 'localhost:7233',
      namespace: flags.namespace ?? env.TEMPORAL_NAMESPACE ?? 'default',
      apiKey: flags.apiKey ?? env.TEMPORAL_API_KEY,
      tls: wantTls
        ? {
            serverNameOverride: flags.tlsServerName ?? env.TEMPORAL_TLS_SERVER_NAME,
            serverRootCACertificate: readOptional(tlsCa, 'the Temporal server CA'),
            clientCertPair: tlsCert ? { crt: readOptional(tlsCert, 'the Temporal client certificate')!, key: readOptional(tlsKey, 'the Temporal client key')! } : undefined,
          }
        : undefined,
    },
    taskQueue: taskQueueName(flags.taskQueue ?? env.FERRY_TASK_QUEUE),
    metricsListen,
    limits,
    reconcileSeconds: positiveInt(flags.reconcileSeconds ?? env.FERRY_RECONCILE_SECONDS, 60, '--reconcile-seconds', 'seconds'),
    workflowBundlePath: env.FERRY_WORKFLOW_BUNDLE ?? null,
    hypervisor: driverKind(flags.hypervisor ?? env.FERRY_HYPERVISOR ?? 'sim'),
  };
}

function taskQueueName(value: string | undefined): string {
  if (value === undefined || value === '') return DEFAULT_TASK_QUEUE;
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/.test(value)) throw new ConfigError(`--task-queue ${value}: use letters, digits, '.', '_' and '-' (at most 200), starting with a letter or digit`);
  return value;
}

function driverKind(value: string): DriverKind {
  if (!(DRIVER_KINDS as readonly string[]).includes(value)) throw new ConfigError(`--hypervisor ${value}: use ${DRIVER_KINDS.join(' or ')}`);
  return value as DriverKind;
}

function parseListen(value: string, flag: string): { host: string; port: number } {
  const parsed = listenSchema.safeParse(value);
  if (!parsed.success) throw new ConfigError(`${flag} ${value}: ${parsed.error.issues[0].message}`);
  const sep = value.lastIndexOf(':');
  const port = Number(value.slice(sep + 1));
  if (port > 65535) throw new ConfigError(`${flag} ${value}: port ${port} is out of range (0-65535)`);
  return { host: value.slice(0, sep).replace(/^\[|\]$/g, ''), port };
}

/** --metrics-listen ADDR:PORT, or the older --metrics-port PORT (all interfaces); neither: metrics off. */
function metricsAddress(flags: AgentFlags, env: NodeJS.ProcessEnv): { host: string; port: number } | null {
  const listen = flags.metricsListen ?? env.FERRY_METRICS_LISTEN;
  const port = flags.metricsPort ?? env.FERRY_METRICS_PORT;
  if (listen && port) throw new ConfigError('give either --metrics-listen ADDR:PORT or --metrics-port PORT, not both');
  if (listen) return parseListen(listen, '--metrics-listen');
  if (port === undefined || port === '') return null;
  const n = Number(port);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new ConfigError(`--metrics-port ${port} is not a port number (or use --metrics-listen ADDR:PORT)`);
  return { host: '0.0.0.0', port: n };
}

function positiveInt(value: string | undefined, fallback: number, flag: string, unit = 'migrations'): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new ConfigError(`${flag} ${value}: expected a whole number of ${unit}, 1 or more`);
  return n;
}
