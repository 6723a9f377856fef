// Host agent configuration: flags first, then the environment, validated with clear errors.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { hostName } from '../common/types';

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
  metricsPort: number | null;
  /** Migrations that may run at once touching this host (as source or destination), and cluster-wide. */
  limits: { host: number; cluster: number };
  /** How often the agent reconciles its shells and leftovers with Temporal (worker/reconcile.ts). */
  reconcileSeconds: number;
  /** A prebuilt workflow bundle (jest and the demo build it once for all agents). */
  workflowBundlePath: string | null;
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
  apiKey?: string;
  tls?: boolean;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsServerName?: string;
  metricsPort?: string;
  maxMigrations?: string;
  clusterMaxMigrations?: string;
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
  const parsed = listenSchema.safeParse(listen);
  if (!parsed.success) throw new ConfigError(`--data-listen ${listen}: ${parsed.error.issues[0].message}`);
  const sep = listen.lastIndexOf(':');
  const port = Number(listen.slice(sep + 1));
  if (port > 65535) throw new ConfigError(`--data-listen ${listen}: port ${port} is out of range (0-65535)`);
  const dataHost = listen.slice(0, sep).replace(/^\[|\]$/g, '');

  const dataTlsCert = flags.dataTlsCert ?? env.FERRY_DATA_TLS_CERT;
  const dataTlsKey = flags.dataTlsKey ?? env.FERRY_DATA_TLS_KEY;
  if (Boolean(dataTlsCert) !== Boolean(dataTlsKey)) throw new ConfigError('data-plane TLS needs both --data-tls-cert and --data-tls-key');

  const tlsCert = flags.tlsCert ?? env.TEMPORAL_TLS_CLIENT_CERT_PATH;
  const tlsKey = flags.tlsKey ?? env.TEMPORAL_TLS_CLIENT_KEY_PATH;
  const tlsCa = flags.tlsCa ?? env.TEMPORAL_TLS_SERVER_CA_CERT_PATH;
  const wantTls = flags.tls || env.TEMPORAL_TLS === 'true' || Boolean(tlsCert || tlsCa);
  if (Boolean(tlsCert) !== Boolean(tlsKey)) throw new ConfigError('Temporal mTLS needs both --tls-cert and --tls-key');

  const metrics = flags.metricsPort ?? env.FERRY_METRICS_PORT;
  const metricsPort = metrics === undefined || metrics === '' ? null : Number(metrics);
  if (metricsPort !== null && (!Number.isInteger(metricsPort) || metricsPort < 0 || metricsPort > 65535)) {
    throw new ConfigError(`--metrics-port ${metrics} is not a port number`);
  }

  const limits = {
    host: positiveInt(flags.maxMigrations ?? env.FERRY_MAX_MIGRATIONS, 4, '--max-migrations'),
    cluster: positiveInt(flags.clusterMaxMigrations ?? env.FERRY_CLUSTER_MAX_MIGRATIONS, 32, '--cluster-max-migrations'),
  };

  return {
    host,
    home,
    dataListenHost: dataHost,
    dataListenPort: port,
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
    metricsPort,
    limits,
    reconcileSeconds: positiveInt(flags.reconcileSeconds ?? env.FERRY_RECONCILE_SECONDS, 60, '--reconcile-seconds', 'seconds'),
    workflowBundlePath: env.FERRY_WORKFLOW_BUNDLE ?? null,
  };
}

function positiveInt(value: string | undefined, fallback: number, flag: string, unit = 'migrations'): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new ConfigError(`${flag} ${value}: expected a whole number of ${unit}, 1 or more`);
  return n;
}
