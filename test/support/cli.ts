// The `ferry` CLI and the examples as child processes against the jest run's Temporal server.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { testTemporalAddress } from './temporal';

const REPO = path.resolve(__dirname, '..', '..');

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a TypeScript entry point of the repository (the `ferry` CLI, an example) as a child process
 * against the test server; `env` entries override (undefined removes) the inherited environment.
 */
export function runScript(script: string, args: string[], env: Record<string, string | undefined> = {}, timeoutMs = 100_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const childEnv: NodeJS.ProcessEnv = { ...process.env, TEMPORAL_ADDRESS: testTemporalAddress(), TEMPORAL_NAMESPACE: 'default' };
    for (const k of Object.keys(childEnv)) if (k.startsWith('TEMPORAL_TLS') || k === 'TEMPORAL_API_KEY') delete childEnv[k];
    for (const [k, v] of Object.entries(env)) {
      if (v === undefined) delete childEnv[k];
      else childEnv[k] = v;
    }
    const child = spawn(process.execPath, ['--import', 'tsx', script, ...args], { cwd: REPO, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
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
