/**
 * A persistent Temporal dev server for people: SQLite file, Web UI, Ferry's search attributes.
 * Runs in the foreground until Ctrl-C. `runDevServer` is the core, for `ferry server`.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { ensureTemporalCli, startDevServer, type LogFn } from './temporal-cli';
import { setTimeout as sleep } from 'node:timers/promises';

/** How long after the server ended a Ctrl-C of ours still counts as the reason. */
const STOP_REQUEST_GRACE_MS = 500;

export interface RunDevServerOptions {
  /** SQLite file; default ~/.local/share/ferry/temporal.db. */
  dbFile?: string;
  port?: number;
  /** null for no Web UI. */
  uiPort?: number | null;
  /** Temporal CLI binary; provisioned with ensureTemporalCli when absent. */
  cliPath?: string;
  log?: LogFn;
  /** Stops the server when aborted; by default SIGINT and SIGTERM stop it. */
  signal?: AbortSignal;
}

export function defaultDbFile(): string {
  const dataHome = process.env.XDG_DATA_HOME || path.join(os.homedir(), '.local', 'share');
  return path.join(dataHome, 'ferry', 'temporal.db');
}

/** Starts the server, prints where it is, and resolves once it has stopped. */
export async function runDevServer(options: RunDevServerOptions = {}): Promise<void> {
  const output = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  let stopping = false;
  // The server's own warnings while shutting down (pollers losing their connection) are noise.
  const log: LogFn = (line) => {
    if (!stopping) output(line);
  };
  const dbFile = path.resolve(options.dbFile ?? defaultDbFile());
  await fsp.mkdir(path.dirname(dbFile), { recursive: true });

  const cliPath = options.cliPath ?? (await provisionCli(log));
  const server = await startDevServer({
    cliPath,
    dbFile,
    port: options.port ?? 7233,
    uiPort: options.uiPort === undefined ? 8233 : options.uiPort,
    log,
  });
  console.log(`Temporal dev server (pid ${server.pid})`);
  console.log(`  address:  ${server.address}`);
  console.log(`  Web UI:   ${server.uiUrl ?? 'disabled'}`);
  console.log(`  database: ${dbFile}`);
  console.log('Ferry search attributes registered. Press Ctrl-C to stop.');

  const stopRequested = new Promise<void>((resolve) => {
    if (options.signal) {
      options.signal.addEventListener('abort', () => resolve(), { once: true });
    } else {
      process.once('SIGINT', () => resolve());
      process.once('SIGTERM', () => resolve());
    }
  });
  const outcome = await Promise.race([stopRequested.then(() => 'stop' as const), server.exited]);
  stopping = true;
  if (outcome === 'stop') {
    console.log('stopping Temporal dev server...');
    await server.stop();
  } else {
    // Ctrl-C in a terminal reaches the server too, and may stop it just before it reaches us.
    const asked = await Promise.race([stopRequested.then(() => true), sleep(STOP_REQUEST_GRACE_MS).then(() => false)]);
    if (!asked) throw new Error(unexpectedExit(server.pid, outcome, server.exitSignal(), dbFile));
  }
  console.log('Temporal dev server stopped');
}

/** A server that ended without being asked to: say how, and how to get it back. */
function unexpectedExit(pid: number, code: number | null, signal: NodeJS.Signals | null, dbFile: string): string {
  const how = signal
    ? `was killed by ${signal}`
    : `exited by itself with code ${code}${code === 0 ? ' (a SIGTERM or SIGINT from outside stops it that way)' : ''}`;
  return `the Temporal dev server (pid ${pid}) ${how}: run \`ferry server\` again; its data is kept in ${dbFile}`;
}

async function provisionCli(log: LogFn): Promise<string> {
  const cli = await ensureTemporalCli({ log });
  if (cli.route === 'sdk') {
    throw new Error('no Temporal CLI available: run `npm run setup:temporal` for details, or set FERRY_TEMPORAL_CLI');
  }
  log(`using Temporal CLI ${cli.version} (${cli.route}): ${cli.path}`);
  return cli.path;
}

function parsePort(value: string): number {
  const port = Number(value);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new InvalidArgumentError('must be a port number (1-65535)');
  return port;
}

async function main(argv: string[]): Promise<void> {
  const program = new Command('dev-server')
    .description('Run a persistent Temporal dev server with the Web UI and Ferry search attributes')
    .option('--db <file>', 'SQLite database file', defaultDbFile())
    .option('--db-filename <file>', 'same as --db')
    .option('--port <port>', 'frontend gRPC port', parsePort, 7233)
    .option('--ui-port <port>', 'Web UI port', parsePort, 8233)
    .option('--headless', 'no Web UI')
    .parse(argv);
  const opts = program.opts<{ db: string; dbFilename?: string; port: number; uiPort: number; headless?: boolean }>();
  await runDevServer({
    dbFile: opts.dbFilename ?? opts.db,
    port: opts.port,
    uiPort: opts.headless ? null : opts.uiPort,
  });
}

if (require.main === module) {
  main(process.argv).catch((err: unknown) => {
    console.error(`dev-server: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
