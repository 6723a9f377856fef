// What every client command shares: connection flags, exit codes, JSON output and error reporting.
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { hostName, vmId } from '../../common/types';
import { connectFerry } from '../connection';
import { FerryRequestError } from '../errors';
import type { FerryClient } from '../ferry-client';

export const EXIT = {
  ok: 0,
  error: 1,
  /** Bad flags or arguments (commander's own errors too). */
  usage: 2,
  rolledBack: 3,
  /** Refused as asked: validation, already running, unknown VM, host without an agent. */
  refused: 4,
  /** Ctrl-C while watching; the migration goes on. */
  interrupted: 130,
} as const;

export interface ConnectionFlags {
  address?: string;
  namespace?: string;
  taskQueue?: string;
  apiKey?: string;
  tls?: boolean;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsServerName?: string;
}

/**
 * The Temporal connection flags. They go on each command rather than on the program, so that
 * `ferry worker` keeps its own (differently named) flags and they work after the command name.
 */
export function withConnectionFlags(cmd: Command): Command {
  return cmd
    .option('--address <host:port>', 'Temporal frontend (env TEMPORAL_ADDRESS; default localhost:7233)')
    .option('--namespace <ns>', 'Temporal namespace (env TEMPORAL_NAMESPACE; default default)')
    .option('--task-queue <name>', 'task queue of the Ferry deployment\'s workflows, as its agents\' --task-queue (env FERRY_TASK_QUEUE; default ferry-migrations)')
    .option('--api-key <key>', 'Temporal API key; implies TLS (env TEMPORAL_API_KEY)')
    .option('--tls', 'connect with TLS (env TEMPORAL_TLS=true)')
    .option('--tls-cert <file>', 'mTLS client certificate (env TEMPORAL_TLS_CLIENT_CERT_PATH)')
    .option('--tls-key <file>', 'mTLS client key (env TEMPORAL_TLS_CLIENT_KEY_PATH)')
    .option('--tls-ca <file>', 'CA of the server certificate (env TEMPORAL_TLS_SERVER_CA_CERT_PATH)')
    .option('--tls-server-name <name>', 'server name to verify, SNI (env TEMPORAL_TLS_SERVER_NAME)');
}

/** Commander argument parsers for names: a malformed one is a usage error (exit 2), before any request. */
function nameArg(check: (text: string) => unknown): (text: string) => string {
  return (text) => {
    try {
      check(text);
    } catch (err) {
      throw new InvalidArgumentError((err as Error).message);
    }
    return text;
  };
}
export const vmIdArg = nameArg(vmId);
export const hostArg = nameArg(hostName);

export function connect(flags: ConnectionFlags): Promise<FerryClient> {
  const fileTls = flags.tlsCert || flags.tlsKey || flags.tlsCa || flags.tlsServerName;
  return connectFerry({
    address: flags.address,
    namespace: flags.namespace,
    taskQueue: flags.taskQueue,
    apiKey: flags.apiKey,
    tls: fileTls ? { cert: flags.tlsCert, key: flags.tlsKey, ca: flags.tlsCa, serverName: flags.tlsServerName } : flags.tls ? true : undefined,
  });
}

/**
 * An action that connects, runs, closes and sets the exit code. With --json, an error is also
 * printed on stdout as {"error": {...}} so that scripts always get JSON.
 */
export function ferryAction<A extends unknown[]>(fn: (ferry: FerryClient, ...args: A) => Promise<number | void>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    const cmd = args[args.length - 1] as Command;
    const flags = cmd.opts<ConnectionFlags & { json?: boolean }>();
    let ferry: FerryClient | null = null;
    try {
      ferry = await connect(flags);
      process.exitCode = (await fn(ferry, ...args)) ?? EXIT.ok;
    } catch (err) {
      if (flags.json) printJson({ error: errorJson(err) });
      throw err;
    } finally {
      await ferry?.close().catch(() => undefined);
    }
  };
}

export function exitCodeFor(err: unknown): number {
  if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
  if (err instanceof FerryRequestError && err.refused) return EXIT.refused;
  return EXIT.error;
}

export function errorJson(err: unknown): { name: string; type: string | null; message: string; refused: boolean } {
  const e = err instanceof Error ? err : new Error(String(err));
  return {
    name: e.name,
    type: e instanceof FerryRequestError ? (e.type ?? null) : null,
    message: e.message,
    refused: e instanceof FerryRequestError && e.refused,
  };
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** Left-aligned columns, for lists on a terminal. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows].map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n');
}
