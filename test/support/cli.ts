// The `ferry` CLI as a child process against the jest run's Temporal server.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { testTemporalAddress } from './temporal';

const REPO = path.resolve(__dirname, '..', '..');

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `ferry ...args`; `env` entries override (undefined removes) the inherited environment. */
export function ferry(args: string[], env: Record<string, string | undefined> = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const childEnv: NodeJS.ProcessEnv = { ...process.env, TEMPORAL_ADDRESS: testTemporalAddress(), TEMPORAL_NAMESPACE: 'default' };
    for (const k of Object.keys(childEnv)) if (k.startsWith('TEMPORAL_TLS') || k === 'TEMPORAL_API_KEY') delete childEnv[k];
    for (const [k, v] of Object.entries(env)) {
      if (v === undefined) delete childEnv[k];
      else childEnv[k] = v;
    }
    const child = spawn(process.execPath, ['--import', 'tsx', 'client/cli/main.ts', ...args], { cwd: REPO, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 100_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Run independent CLI invocations a few at a time (each is a Node process). */
export async function inBatches<T, R>(items: T[], fn: (item: T) => Promise<R>, size = 5): Promise<R[]> {
  const out: R[] = [];
  for (let i = 0; i < items.length; i += size) out.push(...(await Promise.all(items.slice(i, i + size).map(fn))));
  return out;
}
