// The `ferry` CLI and the examples as child processes against the jest run's Temporal server.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { testTemporalAddress } from './temporal';
import { TEST_TASK_QUEUE } from './cluster';

const REPO = path.resolve(__dirname, '..', '..');

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** The test server's connection settings over the inherited environment; `env` entries override (undefined removes). */
function childEnv(env: Record<string, string | undefined>): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { ...process.env, TEMPORAL_ADDRESS: testTemporalAddress(), TEMPORAL_NAMESPACE: 'default', FERRY_TASK_QUEUE: TEST_TASK_QUEUE };
  for (const k of Object.keys(out)) if (k.startsWith('TEMPORAL_TLS') || k === 'TEMPORAL_API_KEY') delete out[k];
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete out[k];
    else out[k] = v;
  }
  return out;
}

/**
 * Runs a TypeScript entry point of the repository (the `ferry` CLI, an example) as a child process
 * against the test server; `env` entries override (undefined removes) the inherited environment.
 */
export function runScript(script: string, args: string[], env: Record<string, string | undefined> = {}, timeoutMs = 100_000): Promise<Run> {
  return runCommand(process.execPath, ['--import', 'tsx', script, ...args], env, timeoutMs);
}

/** Runs any command in the repository against the test server (see runScript). */
export function runCommand(command: string, args: string[], env: Record<string, string | undefined> = {}, timeoutMs = 100_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: REPO, env: childEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** A running `ferry` command whose output can be waited for while it runs. */
export interface LiveRun {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves with the first match of `pattern` in the stream; rejects if the process ends first. */
  waitFor(stream: 'stdout' | 'stderr', pattern: RegExp): Promise<RegExpExecArray>;
  exited: Promise<number | null>;
}

/** Starts `ferry ...args` as `ferry` does; kill it in a finally. */
export function startFerry(args: string[], env: Record<string, string | undefined> = {}): LiveRun {
  return startCommand(process.execPath, ['--import', 'tsx', 'client/cli/main.ts', ...args], env);
}

/** Starts any command in the repository against the test server (see startFerry). */
export function startCommand(command: string, args: string[], env: Record<string, string | undefined> = {}): LiveRun {
  const child = spawn(command, args, { cwd: REPO, env: childEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
  const out = { stdout: '', stderr: '' };
  const listeners: (() => void)[] = [];
  for (const stream of ['stdout', 'stderr'] as const) {
    child[stream]!.on('data', (d: Buffer) => {
      out[stream] += d.toString();
      listeners.forEach((l) => l());
    });
  }
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child,
    stdout: () => out.stdout,
    stderr: () => out.stderr,
    exited,
    waitFor: (stream, pattern) =>
      new Promise((resolve, reject) => {
        const check = () => {
          const m = pattern.exec(out[stream]);
          if (m) resolve(m);
        };
        listeners.push(check);
        check();
        void exited.then((code) => reject(new Error(`"${path.basename(command)} ${args.join(' ')}" exited (${code}) before ${stream} matched ${pattern}:\n${out.stdout}\n${out.stderr}`)));
      }),
  };
}

/** Runs `ferry ...args`. */
export function ferry(args: string[], env: Record<string, string | undefined> = {}): Promise<Run> {
  return runScript('client/cli/main.ts', args, env);
}

/** Run independent CLI invocations a few at a time (each is a Node process). */
export async function inBatches<T, R>(items: T[], fn: (item: T) => Promise<R>, size = 5): Promise<R[]> {
  const out: R[] = [];
  for (let i = 0; i < items.length; i += size) out.push(...(await Promise.all(items.slice(i, i + size).map(fn))));
  return out;
}
