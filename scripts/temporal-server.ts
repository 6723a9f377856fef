/**
 * The production Temporal server (go.temporal.io/server, built into the cache by go-tools.ts) on
 * PostgreSQL: persistence and SQL visibility (so Ferry's search attributes work) in two databases,
 * the schema set up and updated with Temporal's SQL tool from the schema files of the module, the
 * namespace registered and Ferry's search attributes added.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Connection } from '@temporalio/client';
import { msToTs } from '@temporalio/common/lib/time';
import { temporal } from '@temporalio/proto';
import { TEMPORAL_SERVER, ensureGoTool, type GoTool } from './go-tools';
import { FERRY_SEARCH_ATTRIBUTES, stopChild, type SearchAttributeTypeName } from './temporal-cli';
import { collectLines, errorMessage, runStreaming, type LogFn } from './provisioning';

export interface PostgresTarget {
  host: string;
  port: number;
  user: string;
  password: string;
  /** Persistence and visibility databases (created when missing). */
  database: string;
  visibilityDatabase: string;
}

/** postgres://USER[:PASSWORD]@HOST[:PORT][/DATABASE]; the visibility database is DATABASE_visibility. */
export function parsePostgresUrl(url: string): PostgresTarget {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new Error(`--postgres ${url}: not a URL; expected postgres://USER:PASSWORD@HOST:5432/temporal`);
  }
  if (u.protocol !== 'postgres:' && u.protocol !== 'postgresql:') {
    throw new Error(`--postgres ${url}: the scheme must be postgres://, for example postgres://temporal:secret@db.example:5432/temporal`);
  }
  if (!u.hostname) throw new Error(`--postgres ${url}: no host; expected postgres://USER:PASSWORD@HOST:5432/temporal`);
  const database = decodeURIComponent(u.pathname.replace(/^\//, '')) || 'temporal';
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(database)) throw new Error(`--postgres ${url}: database name ${database} must be letters, digits and _`);
  return {
    host: u.hostname.replace(/^\[|\]$/g, ''),
    port: u.port ? Number(u.port) : 5432,
    user: decodeURIComponent(u.username) || 'postgres',
    password: decodeURIComponent(u.password),
    database,
    visibilityDatabase: `${database}_visibility`,
  };
}

/** The server binary, the SQL tool and the schema files, built into the cache when missing. */
export function ensureTemporalServer(opts: { log?: LogFn } = {}): Promise<GoTool> {
  return ensureGoTool(TEMPORAL_SERVER, opts);
}

/**
 * Create both databases when missing and bring their schemas to the version this server needs.
 * Safe to run on every start: an existing schema is only updated.
 */
export async function setupSchema(tool: GoTool, pg: PostgresTarget, opts: { launcher?: string[]; log?: LogFn } = {}): Promise<void> {
  const log = opts.log ?? (() => undefined);
  const schemaRoot = path.join(tool.dir, 'schema', 'postgresql', 'v12');
  for (const [db, kind] of [[pg.database, 'temporal'], [pg.visibilityDatabase, 'visibility']] as const) {
    const base = ['--plugin', 'postgres12', '--ep', pg.host, '-p', String(pg.port), '-u', pg.user, '--db', db];
    const env = { ...process.env, SQL_PASSWORD: pg.password };
    const sql = async (args: string[], tolerate?: RegExp) => {
      const argv = [...(opts.launcher ?? []), tool.bin('temporal-sql-tool'), ...base, ...args];
      const r = await runStreaming(argv[0], argv.slice(1), { env, log: () => undefined });
      const out = r.tail.join('\n');
      if (r.code !== 0 && !(tolerate && tolerate.test(out))) {
        throw new Error(`temporal-sql-tool ${args[0]} on database ${db} at ${pg.host}:${pg.port} failed (exit ${r.code}): ${out}`);
      }
    };
    await sql(['create-database'], /already exists/i);
    await sql(['setup-schema', '-v', '0.0'], /already exists/i);
    await sql(['update-schema', '-d', path.join(schemaRoot, kind, 'versioned')]);
    log(`schema of ${db} (${kind}) is up to date`);
  }
}

export interface ServerPorts {
  frontend: number;
  frontendHttp: number;
  history: number;
  matching: number;
  worker: number;
  /** Membership ports: one per service. */
  membership: [number, number, number, number];
}

export function defaultPorts(frontend = 7233): ServerPorts {
  return {
    frontend,
    frontendHttp: frontend + 10,
    history: frontend + 1,
    matching: frontend + 2,
    worker: frontend + 6,
    membership: [frontend - 300, frontend - 299, frontend - 298, frontend - 294],
  };
}

export interface ServerConfig {
  pg: PostgresTarget;
  /** Address every service binds and advertises. */
  ip: string;
  ports: ServerPorts;
  numHistoryShards?: number;
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
}

/** The server's config file (YAML; JSON is a subset of it). */
export function renderServerConfig(c: ServerConfig, dynamicConfigFile: string): string {
  const store = (db: string, maxConns: number) => ({
    sql: {
      pluginName: 'postgres12',
      databaseName: db,
      connectAddr: `${c.pg.host.includes(':') ? `[${c.pg.host}]` : c.pg.host}:${c.pg.port}`,
      connectProtocol: 'tcp',
      user: c.pg.user,
      password: c.pg.password,
      maxConns,
      maxIdleConns: maxConns,
      maxConnLifetime: '1h',
    },
  });
  const rpc = (grpcPort: number, membershipPort: number, httpPort?: number) => ({ rpc: { grpcPort, membershipPort, bindOnIP: c.ip, ...(httpPort ? { httpPort } : {}) } });
  const config = {
    log: { stdout: true, level: c.logLevel ?? 'warn' },
    persistence: {
      defaultStore: 'default',
      visibilityStore: 'visibility',
      numHistoryShards: c.numHistoryShards ?? 4,
      datastores: { default: store(c.pg.database, 20), visibility: store(c.pg.visibilityDatabase, 10) },
    },
    global: { membership: { maxJoinDuration: '30s', broadcastAddress: c.ip } },
    services: {
      frontend: rpc(c.ports.frontend, c.ports.membership[0], c.ports.frontendHttp),
      history: rpc(c.ports.history, c.ports.membership[1]),
      matching: rpc(c.ports.matching, c.ports.membership[2]),
      worker: rpc(c.ports.worker, c.ports.membership[3]),
    },
    clusterMetadata: {
      enableGlobalNamespace: false,
      failoverVersionIncrement: 10,
      masterClusterName: 'active',
      currentClusterName: 'active',
      clusterInformation: { active: { enabled: true, initialFailoverVersion: 1, rpcName: 'frontend', rpcAddress: `${c.ip}:${c.ports.frontend}` } },
    },
    dcRedirectionPolicy: { policy: 'noop' },
    archival: { history: { state: 'disabled' }, visibility: { state: 'disabled' } },
    namespaceDefaults: { archival: { history: { state: 'disabled' }, visibility: { state: 'disabled' } } },
    dynamicConfigClient: { filepath: dynamicConfigFile, pollInterval: '10s' },
  };
  return `${JSON.stringify(config, null, 2)}\n`;
}

/** Dynamic config: search attributes visible at once after they are added (as the dev server does). */
const DYNAMIC_CONFIG = `system.forceSearchAttributesCacheRefreshOnRead:
  - value: true
frontend.enableUpdateWorkflowExecution:
  - value: true
limit.maxIDLength:
  - value: 255
`;

export interface TemporalServerOptions extends ServerConfig {
  tool: GoTool;
  /** Directory for the config files and the server's log. */
  dir: string;
  /** Prefix of the server command (e.g. `ip netns exec NS`). */
  launcher?: string[];
  /** Where this process reaches the frontend (default IP:PORT of the config). */
  clientAddress?: string;
  namespace?: string;
  searchAttributes?: Record<string, SearchAttributeTypeName>;
  log?: LogFn;
}

export interface TemporalServer {
  /** Where this process reaches the frontend. */
  address: string;
  pid(): number;
  /** kill -9 (no clean shutdown); start() brings it back on the same database. */
  kill(): Promise<void>;
  start(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * Write the config, start the server, wait until its frontend answers, register the namespace and
 * Ferry's search attributes. The schema must be set up first (setupSchema).
 */
export async function startTemporalServer(o: TemporalServerOptions): Promise<TemporalServer> {
  const configDir = path.join(o.dir, 'config');
  await fsp.mkdir(configDir, { recursive: true });
  const dynamic = path.join(configDir, 'dynamic.yaml');
  await fsp.writeFile(dynamic, DYNAMIC_CONFIG);
  await fsp.writeFile(path.join(configDir, 'ferry.yaml'), renderServerConfig(o, dynamic));
  const address = o.clientAddress ?? `${o.ip}:${o.ports.frontend}`;
  const namespace = o.namespace ?? 'default';
  let child: ChildProcess | null = null;
  let exited: Promise<number | null> = Promise.resolve(null);
  let tail: string[] = [];

  const launch = async () => {
    const argv = [...(o.launcher ?? []), o.tool.bin('temporal-server'), '--root', o.dir, '--config', 'config', '--env', 'ferry', '--allow-no-auth', 'start'];
    const c = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    child = c;
    tail = collectLines(c, o.log, 40);
    exited = new Promise((resolve) => {
      c.once('exit', (code) => resolve(code));
      c.once('error', () => resolve(null));
    });
    try {
      await waitForFrontend(address, exited, 120_000);
    } catch (err) {
      await stopChild(c, exited);
      throw new Error(`the Temporal server did not start: ${errorMessage(err)}\n--- last server output ---\n${tail.join('\n')}`);
    }
  };

  await launch();
  const server: TemporalServer = {
    address,
    pid: () => child?.pid ?? -1,
    async kill() {
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGKILL');
      await exited;
    },
    start: launch,
    async stop() {
      if (child) await stopChild(child, exited);
    },
  };
  try {
    await registerNamespace(address, namespace, o.searchAttributes ?? FERRY_SEARCH_ATTRIBUTES);
  } catch (err) {
    await server.stop();
    throw err;
  }
  return server;
}

async function waitForFrontend(address: string, exited: Promise<number | null>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  let dead: number | null | undefined;
  void exited.then((code) => (dead = code));
  // One lazy connection, each probe bounded by a gRPC deadline: Connection.connect with a connect
  // timeout leaves a retry timer behind that fires on the closed channel when the port accepts but
  // nothing answers (a forward into a namespace whose server is still starting).
  const connection = Connection.lazy({ address });
  try {
    while (Date.now() < deadline) {
      if (dead !== undefined) throw new Error(`the server exited (code ${dead})`);
      try {
        await connection.withDeadline(Date.now() + 2000, () => connection.workflowService.getSystemInfo({}));
        return;
      } catch (err) {
        last = errorMessage(err);
      }
      await sleep(500);
    }
  } finally {
    await connection.close().catch(() => undefined);
  }
  throw new Error(`its frontend at ${address} did not answer within ${timeoutMs / 1000} s (last error: ${last})`);
}

const INDEXED: Record<SearchAttributeTypeName, temporal.api.enums.v1.IndexedValueType> = {
  Keyword: temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
  Text: temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
  Int: temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_INT,
  Double: temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
  Bool: temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
  Datetime: temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
  KeywordList: temporal.api.enums.v1.IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
};

/** Register the namespace (when missing) and add the search attributes that are missing; wait until both are in effect. */
export async function registerNamespace(address: string, namespace: string, attributes: Record<string, SearchAttributeTypeName>): Promise<void> {
  const connection = await Connection.connect({ address });
  try {
    try {
      await connection.workflowService.registerNamespace({ namespace, workflowExecutionRetentionPeriod: msToTs('3 days') });
    } catch (err) {
      if (!/already exists/i.test(errorMessage(err))) throw new Error(`cannot register namespace ${namespace}: ${errorMessage(err)}`);
    }
    // A new namespace reaches every service's cache within seconds.
    await retry(`namespace ${namespace} to be usable`, 60_000, () => connection.workflowService.describeNamespace({ namespace }));
    const existing = await retry('the search attributes', 60_000, () => connection.operatorService.listSearchAttributes({ namespace }));
    const missing = Object.entries(attributes).filter(([name]) => !(name in (existing.customAttributes ?? {})));
    if (missing.length) {
      await connection.operatorService.addSearchAttributes({ namespace, searchAttributes: Object.fromEntries(missing.map(([n, t]) => [n, INDEXED[t]])) });
    }
    await retry('the search attributes to be registered', 60_000, async () => {
      const now = await connection.operatorService.listSearchAttributes({ namespace });
      const absent = Object.keys(attributes).filter((n) => !(n in (now.customAttributes ?? {})));
      if (absent.length) throw new Error(`not yet registered: ${absent.join(', ')}`);
    });
  } finally {
    await connection.close();
  }
}

async function retry<T>(what: string, timeoutMs: number, fn: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${errorMessage(err)}`);
      await sleep(500);
    }
  }
}

export interface RunProductionServerOptions {
  postgresUrl: string;
  /** Address the server binds and advertises (default 127.0.0.1; 0.0.0.0 is not allowed: it is advertised). */
  ip?: string;
  /** Frontend port; the other services take the ports beside it (defaultPorts). */
  port?: number;
  /** Config files and the server's own state; default ~/.local/share/ferry/temporal-server. */
  dir?: string;
  namespace?: string;
  log?: LogFn;
}

/** `ferry server --postgres URL`: schema set up or updated, the server started, until SIGINT/SIGTERM. */
export async function runProductionServer(o: RunProductionServerOptions): Promise<void> {
  const log = o.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const ip = o.ip ?? '127.0.0.1';
  if (ip === '0.0.0.0' || ip === '::') throw new Error(`--ip ${ip}: the server advertises this address to its own services; give the host's address`);
  const pg = parsePostgresUrl(o.postgresUrl);
  const tool = await ensureTemporalServer({ log });
  log(`Temporal server ${TEMPORAL_SERVER.version}: ${tool.bin('temporal-server')} (${tool.route})`);
  await setupSchema(tool, pg, { log });
  const dataHome = process.env.XDG_DATA_HOME || path.join(process.env.HOME ?? '.', '.local', 'share');
  const ports = defaultPorts(o.port ?? 7233);
  const server = await startTemporalServer({ tool, dir: o.dir ?? path.join(dataHome, 'ferry', 'temporal-server'), pg, ip, ports, namespace: o.namespace, log });
  console.log(`Temporal server (pid ${server.pid()}) on PostgreSQL ${pg.host}:${pg.port}/${pg.database} (+ ${pg.visibilityDatabase})`);
  console.log(`  address:  ${server.address}  (history ${ports.history}, matching ${ports.matching}, worker ${ports.worker}, membership ${ports.membership.join('/')})`);
  console.log(`  namespace ${o.namespace ?? 'default'} with Ferry's search attributes. Press Ctrl-C to stop.`);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', () => resolve());
    process.once('SIGTERM', () => resolve());
  });
  console.log('stopping the Temporal server...');
  await server.stop();
}
