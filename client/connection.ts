// connectFerry: a FerryClient on a Temporal connection configured like Temporal's own tools, from
// arguments first and then the standard TEMPORAL_* environment variables.
import { readFileSync } from 'node:fs';
import { Client, Connection, type TLSConfig } from '@temporalio/client';
import { FerryClient } from './ferry-client';
import { FerryRequestError } from './errors';
import { DEFAULT_TASK_QUEUE } from '../common/types';

export interface FerryTlsOptions {
  /** mTLS client certificate: a file path or its PEM contents. */
  cert?: string | Buffer;
  /** mTLS client key: a file path or its PEM contents. */
  key?: string | Buffer;
  /** CA of the server's certificate: a file path or its PEM contents (default: the system's CAs). */
  ca?: string | Buffer;
  /** Override of the name checked against the server's certificate (SNI). */
  serverName?: string;
}

export interface ConnectFerryOptions {
  /** host:port of the Temporal frontend (env TEMPORAL_ADDRESS; default localhost:7233). */
  address?: string;
  /** env TEMPORAL_NAMESPACE; default 'default'. */
  namespace?: string;
  /** The Ferry deployment's workflow task queue, as its agents' --task-queue (env FERRY_TASK_QUEUE; default ferry-migrations). */
  taskQueue?: string;
  /** env TEMPORAL_API_KEY; an API key turns TLS on unless tls is false. */
  apiKey?: string;
  /**
   * true or options for TLS, false for none. Default from TEMPORAL_TLS=true, or on when a client
   * certificate or server CA is given (TEMPORAL_TLS_CLIENT_CERT_PATH, TEMPORAL_TLS_CLIENT_KEY_PATH,
   * TEMPORAL_TLS_SERVER_CA_CERT_PATH, TEMPORAL_TLS_SERVER_NAME).
   */
  tls?: boolean | FerryTlsOptions;
  /** Environment to read instead of process.env. */
  env?: NodeJS.ProcessEnv;
}

export interface ResolvedConnection {
  address: string;
  namespace: string;
  taskQueue: string;
  apiKey?: string;
  tls?: TLSConfig | boolean;
}

/** The connection settings connectFerry would use (exposed for tools that show them). */
export function resolveConnection(options: ConnectFerryOptions = {}): ResolvedConnection {
  const env = options.env ?? process.env;
  const blank = (v: string | undefined) => (v === undefined || v === '' ? undefined : v);
  const apiKey = options.apiKey ?? blank(env.TEMPORAL_API_KEY);
  const given = typeof options.tls === 'object' ? options.tls : {};
  const tlsOpts: FerryTlsOptions = {
    cert: given.cert ?? blank(env.TEMPORAL_TLS_CLIENT_CERT_PATH),
    key: given.key ?? blank(env.TEMPORAL_TLS_CLIENT_KEY_PATH),
    ca: given.ca ?? blank(env.TEMPORAL_TLS_SERVER_CA_CERT_PATH),
    serverName: given.serverName ?? blank(env.TEMPORAL_TLS_SERVER_NAME),
  };
  const envTls = blank(env.TEMPORAL_TLS)?.toLowerCase();
  let wanted: boolean | undefined =
    typeof options.tls === 'boolean' ? options.tls : typeof options.tls === 'object' ? true : envTls === undefined ? undefined : envTls === 'true' || envTls === '1';
  if (wanted === undefined && (tlsOpts.cert || tlsOpts.ca || tlsOpts.serverName)) wanted = true;
  if (Boolean(tlsOpts.cert) !== Boolean(tlsOpts.key)) {
    throw new FerryRequestError('Temporal mTLS needs both a client certificate and its key (--tls-cert and --tls-key, or TEMPORAL_TLS_CLIENT_CERT_PATH and TEMPORAL_TLS_CLIENT_KEY_PATH)', 'InvalidArgument');
  }
  let tls: TLSConfig | boolean | undefined;
  if (wanted === true) {
    tls = {
      serverNameOverride: tlsOpts.serverName,
      serverRootCACertificate: tlsOpts.ca ? pem(tlsOpts.ca, 'the Temporal server CA certificate') : undefined,
      clientCertPair: tlsOpts.cert ? { crt: pem(tlsOpts.cert, 'the Temporal client certificate'), key: pem(tlsOpts.key!, 'the Temporal client key') } : undefined,
    };
  } else if (wanted === false) {
    tls = false;
  } // undefined: the SDK turns TLS on when there is an API key
  return {
    address: options.address ?? blank(env.TEMPORAL_ADDRESS) ?? 'localhost:7233',
    namespace: options.namespace ?? blank(env.TEMPORAL_NAMESPACE) ?? 'default',
    taskQueue: options.taskQueue ?? blank(env.FERRY_TASK_QUEUE) ?? DEFAULT_TASK_QUEUE,
    apiKey,
    tls,
  };
}

/** Connect to Temporal and return a FerryClient that owns the connection (close it with close()). */
export async function connectFerry(options: ConnectFerryOptions = {}): Promise<FerryClient> {
  const c = resolveConnection(options);
  let connection: Connection;
  try {
    connection = await Connection.connect({ address: c.address, tls: c.tls, apiKey: c.apiKey, connectTimeout: '5 seconds' });
  } catch (err) {
    throw new FerryRequestError(
      `cannot reach Temporal at ${c.address} (${(err as Error).message}): start a server (ferry server) or point --address / TEMPORAL_ADDRESS at yours`,
      'TemporalUnavailable',
    );
  }
  return new FerryClient(new Client({ connection, namespace: c.namespace }), { taskQueue: c.taskQueue });
}

/** A PEM given as contents (Buffer or a string holding "-----BEGIN") or as a file path. */
function pem(value: string | Buffer, what: string): Buffer {
  if (Buffer.isBuffer(value)) return value;
  if (value.includes('-----BEGIN')) return Buffer.from(value);
  try {
    return readFileSync(value);
  } catch (err) {
    throw new FerryRequestError(`cannot read ${what} ${value}: ${(err as Error).message}`, 'InvalidArgument');
  }
}
