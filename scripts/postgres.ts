/**
 * PostgreSQL for the production Temporal server: Debian's binaries (installed with apt-get when
 * missing and we are root), and a throwaway database cluster in a directory of its own (`initdb`),
 * started, stopped, killed and restarted by the tests. As root, the server runs as the `postgres`
 * user (PostgreSQL refuses to run as root).
 */
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync } from 'node:fs';
import path from 'node:path';
import type { LogFn } from './temporal-cli';

export interface PostgresBinaries {
  /** Directory holding initdb, pg_ctl and postgres. */
  dir: string;
}

const INSTALL_HINT = 'install PostgreSQL (Debian: apt-get install postgresql) or set FERRY_PG_BIN to the directory of its initdb and pg_ctl';

/** initdb and pg_ctl: FERRY_PG_BIN, Debian's /usr/lib/postgresql/N/bin (newest), or PATH. */
export function findPostgres(env: NodeJS.ProcessEnv = process.env): PostgresBinaries | null {
  const has = (dir: string) => existsSync(path.join(dir, 'initdb')) && existsSync(path.join(dir, 'pg_ctl'));
  if (env.FERRY_PG_BIN) {
    if (!has(env.FERRY_PG_BIN)) throw new Error(`FERRY_PG_BIN=${env.FERRY_PG_BIN} holds no initdb and pg_ctl: ${INSTALL_HINT}`);
    return { dir: env.FERRY_PG_BIN };
  }
  const debian = '/usr/lib/postgresql';
  if (existsSync(debian)) {
    const versions = readdirSync(debian).filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a));
    for (const v of versions) if (has(path.join(debian, v, 'bin'))) return { dir: path.join(debian, v, 'bin') };
  }
  for (const dir of (env.PATH ?? '').split(path.delimiter).filter(Boolean)) if (has(dir)) return { dir };
  return null;
}

/**
 * PostgreSQL's binaries, installed with apt-get when they are missing and this process is root. The
 * package would create and start a cluster of its own on port 5432: Ferry turns that off first
 * (createcluster.conf), since its tests make their own in temporary directories.
 */
export async function ensurePostgres(opts: { log?: LogFn } = {}): Promise<PostgresBinaries> {
  const log = opts.log ?? (() => undefined);
  const found = findPostgres();
  if (found) return found;
  const root = process.getuid?.() === 0;
  if (!root || spawnSync('apt-get', ['--version'], { stdio: 'ignore' }).status !== 0) {
    throw new Error(`PostgreSQL is not installed: ${INSTALL_HINT}`);
  }
  const conf = '/etc/postgresql-common/createcluster.conf';
  if (!existsSync(conf)) {
    await fsp.mkdir(path.dirname(conf), { recursive: true });
    await fsp.writeFile(conf, '# Written by Ferry before installing PostgreSQL: no cluster of the package\'s own.\ncreate_main_cluster = false\n');
  }
  const aptGet = (...args: string[]) => {
    log(`apt-get ${args.join(' ')}`);
    return (
      spawnSync('apt-get', ['-o', 'DPkg::Lock::Timeout=600', '-o', 'Dpkg::Options::=--force-confold', ...args], {
        stdio: ['ignore', 'inherit', 'inherit'],
        env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
      }).status === 0
    );
  };
  const install = ['install', '-y', '--no-install-recommends', 'postgresql'];
  if (!aptGet(...install) && !(aptGet('update') && aptGet(...install))) {
    throw new Error(`apt-get install postgresql failed (see its output above): ${INSTALL_HINT}`);
  }
  const installed = findPostgres();
  if (!installed) throw new Error(`apt-get installed postgresql, but no initdb and pg_ctl were found: ${INSTALL_HINT}`);
  return installed;
}

export interface PostgresOptions {
  bin: PostgresBinaries;
  /** The cluster's directory (created; must not exist or be empty). */
  dir: string;
  /** Address to listen on, and port. */
  host: string;
  port: number;
  /** Prefix of every command: e.g. `ip netns exec NS`, to run inside a network namespace. */
  launcher?: string[];
}

/** A database cluster of its own, with trust authentication for the local user `postgres`. */
export class PostgresCluster {
  private constructor(private readonly opts: PostgresOptions, private readonly asUser: string[]) {}

  /** initdb into opts.dir. */
  static async init(opts: PostgresOptions): Promise<PostgresCluster> {
    const asUser = process.getuid?.() === 0 ? ['runuser', '-u', 'postgres', '--'] : [];
    await fsp.mkdir(opts.dir, { recursive: true });
    if (asUser.length) {
      const uid = Number(await output('id', ['-u', 'postgres']));
      const gid = Number(await output('id', ['-g', 'postgres']));
      await fsp.chown(opts.dir, uid, gid);
      // The user must reach the directory: open up the path's parents that we created (a mkdtemp dir is 0700).
      await fsp.chmod(path.dirname(opts.dir), 0o755);
    }
    await fsp.chmod(opts.dir, 0o700);
    const pg = new PostgresCluster(opts, asUser);
    await pg.run('initdb', ['-D', pg.dataDir, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8']);
    return pg;
  }

  get dataDir(): string {
    return path.join(this.opts.dir, 'data');
  }

  get host(): string {
    return this.opts.host;
  }

  get port(): number {
    return this.opts.port;
  }

  /** postgres://postgres@HOST:PORT (trust authentication: no password). */
  get url(): string {
    return `postgres://postgres@${this.opts.host}:${this.opts.port}`;
  }

  async start(): Promise<void> {
    const options = `-p ${this.opts.port} -h ${this.opts.host} -k ${this.opts.dir} -c fsync=off -c max_connections=200`;
    await this.run('pg_ctl', ['start', '-w', '-t', '60', '-D', this.dataDir, '-l', path.join(this.opts.dir, 'postgres.log'), '-o', options]);
  }

  /** A clean shutdown (pg_ctl stop -m fast): sessions are ended, the server can start again at once. */
  async stop(): Promise<void> {
    await this.run('pg_ctl', ['stop', '-w', '-t', '60', '-m', 'fast', '-D', this.dataDir]).catch(async (err: Error) => {
      if (!(await this.running())) return;
      throw err;
    });
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  async running(): Promise<boolean> {
    const r = await this.run('pg_ctl', ['status', '-D', this.dataDir]).then(() => true, () => false);
    return r;
  }

  /** The last lines of the server's log, for error messages. */
  async logTail(lines = 30): Promise<string> {
    const text = await fsp.readFile(path.join(this.opts.dir, 'postgres.log'), 'utf8').catch(() => '');
    return text.split('\n').slice(-lines).join('\n');
  }

  private run(tool: string, args: string[]): Promise<string> {
    const argv = [...(this.opts.launcher ?? []), ...this.asUser, path.join(this.opts.bin.dir, tool), ...args];
    return output(argv[0], argv.slice(1));
  }
}

function output(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: 120_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${path.basename(cmd)} ${args.join(' ')} failed: ${(stderr || stdout || err.message).trim()}`));
      else resolve(stdout.trim());
    });
  });
}
