// `ferry server`: a local Temporal dev server with persistence, the Web UI and Ferry's search attributes;
// with --postgres, the production Temporal server on a PostgreSQL database instead.
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
    .option('--postgres <url>', 'run the production Temporal server on this PostgreSQL instead (postgres://USER:PASSWORD@HOST:5432/DB; visibility in DB_visibility)')
    .option('--ip <addr>', 'with --postgres: the address the server binds and advertises', '127.0.0.1')
    .action(async (f: { db: string; port: number; uiPort: number; headless?: boolean; postgres?: string; ip: string }) => {
      if (f.postgres) {
        // Loaded only here: the dev server path needs none of it.
        const { runProductionServer } = await import('../../scripts/temporal-server');
        await runProductionServer({ postgresUrl: f.postgres, ip: f.ip, port: f.port });
        return;
      }
      await runDevServer({ dbFile: f.db, port: f.port, uiPort: f.headless ? null : f.uiPort });
    });
}
