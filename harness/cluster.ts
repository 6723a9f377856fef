// Simulated hosts on one machine: each host is a state directory plus a real agent process.
// Used by the integration tests, the demo, the chaos harness and the benchmarks.
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { Client, Connection } from '@temporalio/client';
import { bundleWorkflowCode } from '@temporalio/worker';
import { nodeEntryArgs } from '../common/node-entry';
import { DEFAULT_TASK_QUEUE } from '../common/types';
import { FerryClient } from '../client/ferry-client';
import { ferryCacheRoot, freePort } from '../scripts/temporal-cli';
import { writeFileDurable } from '../common/durable-file';
import { collectLines } from '../scripts/provisioning';

const REPO = path.resolve(__dirname, '..');

let bundlePromise: Promise<string> | null = null;

/**
 * Bundle the workflow code once per process, so every agent starts fast. The file is named by its
 * content in the cache: processes running the same code share it, and none has to remove it.
 */
export function workflowBundle(): Promise<string> {
  if (process.env.FERRY_WORKFLOW_BUNDLE) return Promise.resolve(process.env.FERRY_WORKFLOW_BUNDLE);
  bundlePromise ??= (async () => {
    const { code } = await bundleWorkflowCode({ workflowsPath: path.join(REPO, 'workflows'), logger: quietLogger });
    const dir = path.join(ferryCacheRoot(), 'workflow-bundles');
    await fs.mkdir(dir, { recursive: true });
    const file = path.join(dir, `${createHash('sha256').update(code).digest('hex').slice(0, 16)}.js`);
    await writeFileDurable(file, code);
    await pruneBundles(dir, file);
    return file;
  })();
  return bundlePromise;
}

/** Bundles of code changed since: a day without use is long past any process that started from them. */
async function pruneBundles(dir: string, keep: string): Promise<void> {
  for (const name of await fs.readdir(dir)) {
    const file = path.join(dir, name);
    if (file === keep) continue;
    const st = await fs.stat(file).catch(() => null);
    if (st && Date.now() - st.mtimeMs > 24 * 3600_000) await fs.rm(file, { force: true });
  }
}

const noop = () => undefined;
const quietLogger = { trace: noop, debug: noop, info: noop, warn: noop, error: noop, log: noop };

export interface AgentProcess {
  host: string;
  home: string;
  dataPort: number;
  process: ChildProcess;
  dataAddress: string;
  /** Port of the agent's Prometheus /metrics, when the cluster serves metrics. */
  metricsPort: number | null;
}

export interface ClusterOptions {
  temporalAddress: string;
  hosts: string[];
  /**
   * The hosts' homes and logs. Without it the cluster makes a temporary directory and removes it at
   * `stop()` (kept when FERRY_KEEP_TMP=1, to read the agents' logs after a failure).
   */
  root?: string;
  namespace?: string;
  /** The workflow task queue of this cluster's agents (default ferry-migrations): clusters on one server keep apart by it. */
  taskQueue?: string;
  secret?: string;
  /** Extra environment for the agents. */
  env?: Record<string, string>;
  /** Extra environment for one host's agent, on every (re)start (e.g. the address it advertises). */
  hostEnv?: (host: string) => Record<string, string>;
  /** Serve Prometheus metrics from every agent (on a free port: AgentProcess.metricsPort). */
  metrics?: boolean;
  /** The data port of a host's agent (default: a free port of this machine). */
  dataPort?: (host: string) => number;
  /** Where each host's agent runs: by default on this machine's loopback, like every other host. */
  placement?: (host: string) => AgentPlacement;
  /**
   * Run the agents from the compiled dist/ (`npm run build`), as a deployment does: they then start
   * their VM processes from compiled JavaScript too. Default: from the sources, through tsx.
   */
  compiled?: boolean;
}

/** An agent somewhere else than this process's loopback: inside a network namespace, say. */
export interface AgentPlacement {
  /** Prefix of the agent's command line (e.g. `ip netns exec NS`). */
  launcher: string[];
  /** Address its data plane listens on. */
  dataListenHost: string;
  /** Where it reaches Temporal from there. */
  temporalAddress: string;
}

export class LocalCluster {
  readonly agents = new Map<string, AgentProcess>();
  private readonly ports = new Map<string, number>();

  private constructor(
    readonly root: string,
    readonly opts: ClusterOptions,
    readonly secret: string,
    readonly client: Client,
    private readonly connection: Connection,
    private readonly bundle: string,
  ) {}

  static async start(opts: ClusterOptions): Promise<LocalCluster> {
    const root = opts.root ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-cluster-')));
    await fs.mkdir(root, { recursive: true });
    let bundle: Awaited<ReturnType<typeof workflowBundle>>;
    let connection: Connection;
    try {
      bundle = await workflowBundle();
      connection = await Connection.connect({ address: opts.temporalAddress });
    } catch (err) {
      // Nothing of the cluster exists yet: only a root made here is ours to remove.
      if (!opts.root) await fs.rm(root, { recursive: true, force: true });
      throw err;
    }
    const client = new Client({ connection, namespace: opts.namespace ?? 'default' });
    const cluster = new LocalCluster(root, opts, opts.secret ?? randomBytes(24).toString('hex'), client, connection, bundle);
    try {
      await Promise.all(opts.hosts.map((h) => cluster.startAgent(h)));
    } catch (err) {
      await cluster.stop();
      throw err;
    }
    return cluster;
  }

  get taskQueue(): string {
    return this.opts.taskQueue ?? DEFAULT_TASK_QUEUE;
  }

  /** A FerryClient of this cluster's deployment. */
  ferryClient(): FerryClient {
    return new FerryClient(this.client, { taskQueue: this.taskQueue });
  }

  home(host: string): string {
    return path.join(this.root, host);
  }

  /** An agent's log, beside its home rather than in it (a test may fill the home's filesystem). */
  logFile(host: string): string {
    return path.join(this.root, 'logs', `${host}.agent.log`);
  }

  /**
   * Start (or restart) the agent of a host, on the same data port as before. `repo` runs it from
   * another checkout of Ferry (a changed build, for upgrade tests), which bundles its own workflows.
   */
  async startAgent(host: string, extraEnv: Record<string, string> = {}, opts: { repo?: string } = {}): Promise<AgentProcess> {
    const home = this.home(host);
    await fs.mkdir(home, { recursive: true });
    let port = this.ports.get(host);
    if (port === undefined) {
      port = this.opts.dataPort?.(host) ?? (await freePort());
      this.ports.set(host, port);
    }
    await fs.mkdir(path.dirname(this.logFile(host)), { recursive: true });
    const log = createWriteStream(this.logFile(host), { flags: 'a' });
    log.on('error', (err) => process.stderr.write(`agent ${host}'s log ${this.logFile(host)}: ${err.message}\n`));
    const place = this.opts.placement?.(host) ?? { launcher: [], dataListenHost: '127.0.0.1', temporalAddress: this.opts.temporalAddress };
    const repo = opts.repo ?? REPO;
    const argv = [
      ...place.launcher,
      process.execPath,
      ...(this.opts.compiled ? [await compiledEntry(repo, path.join('client', 'cli', 'main.js'))] : nodeEntryArgs(path.join(repo, 'client', 'cli', 'main'))),
      'worker',
      '--host', host,
      '--home', home,
      '--data-listen', `${place.dataListenHost}:${port}`,
      '--temporal-address', place.temporalAddress,
      '--namespace', this.opts.namespace ?? 'default',
      '--task-queue', this.taskQueue,
      ...(this.opts.metrics ? ['--metrics-listen', `${place.dataListenHost}:0`] : []),
    ];
    const child = spawn(
      argv[0],
      argv.slice(1),
      {
        cwd: repo,
        env: {
          ...process.env,
          FERRY_DATA_SECRET: this.secret,
          ...(opts.repo ? {} : { FERRY_WORKFLOW_BUNDLE: this.bundle }),
          FERRY_LOG_PRETTY: '0',
          ...this.opts.env,
          ...this.opts.hostEnv?.(host),
          ...extraEnv,
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    child.stderr!.pipe(log);
    // The last lines it printed: an agent that exits before it is ready says why there.
    const startup = collectLines(child, undefined, 12);
    const ready = await new Promise<{ dataAddress: string; metricsPort: number | null }>((resolve, reject) => {
      let buf = '';
      const timer = setTimeout(() => {
        child.kill('SIGKILL'); // not registered yet: nothing else would stop it
        reject(new Error(`agent ${host} did not become ready in 60 s; see ${this.logFile(host)}${lastOutput(startup)}`));
      }, 60_000);
      child.stdout!.on('data', (chunk: Buffer) => {
        log.write(chunk);
        buf += chunk.toString();
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.includes('"agent ready"')) {
            clearTimeout(timer);
            resolve(JSON.parse(line) as { dataAddress: string; metricsPort: number | null });
          }
        }
      });
      // 'close', not 'exit': the output is all read by then, so the error can carry its last lines.
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`agent ${host} exited (${code ?? signal}) before it was ready; see ${this.logFile(host)}${lastOutput(startup)}`));
      });
    });
    const agent: AgentProcess = { host, home, dataPort: port, process: child, dataAddress: ready.dataAddress, metricsPort: ready.metricsPort };
    this.agents.set(host, agent);
    return agent;
  }

  /** kill -9 of a host's agent (its VM processes live on). */
  async killAgent(host: string, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const agent = this.agents.get(host);
    if (!agent || agent.process.exitCode !== null || agent.process.signalCode !== null) return;
    const exited = new Promise((r) => agent.process.once('exit', r));
    agent.process.kill(signal);
    // A graceful stop waits for running activities; past 10 s it is no longer graceful.
    const force = setTimeout(() => agent.process.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(force);
    this.agents.delete(host);
  }

  /** PIDs of the VM processes of a host that are alive. */
  async vmProcesses(host: string): Promise<{ vmId: string; pid: number }[]> {
    const dir = path.join(this.home(host), 'vms');
    const out: { vmId: string; pid: number }[] = [];
    let names: string[] = [];
    try {
      names = await fs.readdir(dir);
    } catch {
      return out;
    }
    for (const vmId of names) {
      const pid = Number(await fs.readFile(path.join(dir, vmId, 'pid'), 'utf8').catch(() => 'NaN'));
      if (Number.isInteger(pid) && isAlive(pid)) out.push({ vmId, pid });
    }
    return out;
  }

  async stop(): Promise<void> {
    await Promise.all([...this.agents.keys()].map((h) => this.killAgent(h, 'SIGTERM')));
    for (const host of this.opts.hosts) {
      for (const { pid } of await this.vmProcesses(host)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
    await this.connection.close();
    if (!this.opts.root && process.env.FERRY_KEEP_TMP !== '1') await fs.rm(this.root, { recursive: true, force: true, maxRetries: 3 });
  }
}

async function compiledEntry(repo: string, file: string): Promise<string> {
  const js = path.join(repo, 'dist', file);
  if (!(await fs.stat(js).catch(() => null))) throw new Error(`${js} not found: run npm run build in ${repo} first`);
  return js;
}

function lastOutput(lines: string[]): string {
  return lines.length > 0 ? `; its last output:\n${lines.join('\n')}` : '';
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
