// Helpers shared by the provisioning scripts (Temporal CLI, QEMU and the guest): child processes
// with streamed output, executable checks, temp siblings for atomic renames.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants as fsConstants, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';

export type LogFn = (line: string) => void;

export interface StreamResult {
  code: number | null;
  notFound: boolean;
  tail: string[];
}

/** Runs a command, passing each output line to log and keeping the last lines for error messages. */
export function runStreaming(cmd: string, args: string[], opts: { log: LogFn; env?: NodeJS.ProcessEnv; cwd?: string }): Promise<StreamResult> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env: opts.env ?? process.env, cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const tail = collectLines(child, opts.log, 30);
    child.once('error', (err: NodeJS.ErrnoException) => {
      resolve({ code: null, notFound: err.code === 'ENOENT', tail: [...tail, err.message] });
    });
    child.once('close', (code) => resolve({ code, notFound: false, tail }));
  });
}

/** Reads stdout and stderr line by line (a pipe nobody reads would eventually block the child). */
export function collectLines(child: ChildProcess, log: LogFn | undefined, keep: number): string[] {
  const tail: string[] = [];
  for (const stream of [child.stdout, child.stderr]) {
    if (!stream) continue;
    readline.createInterface({ input: stream, crlfDelay: Infinity }).on('line', (line) => {
      if (!line.trim()) return;
      tail.push(line);
      if (tail.length > keep) tail.shift();
      log?.(line);
    });
  }
  return tail;
}

export async function isExecutable(file: string): Promise<boolean> {
  try {
    const stat = await fsp.stat(file);
    if (!stat.isFile()) return false;
    await fsp.access(file, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The first executable `name` in a PATH directory, or null. */
export async function findOnPath(name: string): Promise<string | null> {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir && (await isExecutable(path.join(dir, name)))) return path.join(dir, name);
  }
  return null;
}

/** A name beside `file` for building it before an atomic rename (unique per process and call). */
export function tempSibling(file: string): string {
  return `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
