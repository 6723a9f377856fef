// `ferry server`: a local Temporal dev server with persistence, the Web UI and Ferry's search attributes.
import { Command, InvalidArgumentError } from 'commander';
import { defaultDbFile, runDevServer } from '../../scripts/dev-server';

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new InvalidArgumentError('must be a port number (1-65535)');
  return n;
}

export function serverCommand(): Command {
  return new Command('server')
    .description('run a local Temporal dev server (SQLite persistence, Web UI, Ferry search attributes) until Ctrl-C')
    .option('--db <file>', 'SQLite database file', defaultDbFile())
    .option('--port <port>', 'frontend gRPC port', port, 7233)
    .option('--ui-port <port>', 'Web UI port', port, 8233)
    .option('--headless', 'no Web UI')
    .action(async (f: { db: string; port: number; uiPort: number; headless?: boolean }) => {
      await runDevServer({ dbFile: f.db, port: f.port, uiPort: f.headless ? null : f.uiPort });
    });
}
