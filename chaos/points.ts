// Injection points: where in a migration a fault strikes. Phase points are found from the workflow's
// progress (with a slow link so the phase lasts); switchover points are named pause points inside the
// agents (common/fault-points.ts), as is the postcopy point: the harness arms one, waits for
// `.reached`, injects, then releases.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import type { MigrationHandle } from '../client/ferry-client';
import type { MigrationProgress } from '../common/migration';
import type { FaultPointName } from '../common/fault-points';
import { setTimeout as sleep } from 'node:timers/promises';

export const POINTS = [
  'disk-precopy',
  'dirty-rounds',
  'memory-precopy',
  'before-pause',
  'after-pause',
  'after-prepared',
  'after-commit',
  'postcopy',
] as const;
export type PointName = (typeof POINTS)[number];

/** Points at or after the commit: the destination runs the VM from there on. */
export const AFTER_COMMIT: readonly PointName[] = ['after-commit', 'postcopy'];

const SLOW_LINK = 3 * 1024 * 1024;
const FIRST_PASS_LINK = 1024 * 1024;

export interface PointContext {
  handle: MigrationHandle;
  faultDir: string;
  signal: AbortSignal;
}

export interface Point {
  /** The link speed the migration starts with (bytes/s, null = unlimited). */
  bandwidth: number | null;
  /** Before the migration starts. */
  arm(ctx: { faultDir: string }): Promise<void>;
  /** Resolves once the migration is at the point (and holds there, for the switchover points). */
  reach(ctx: PointContext): Promise<void>;
  /** After the injection: let the migration go on. */
  release(ctx: PointContext): Promise<void>;
}

export function point(name: PointName): Point {
  switch (name) {
    case 'disk-precopy':
      // Slower still: the server sees the pass's progress only every few seconds (heartbeats are throttled).
      return phasePoint((p) => p.phase === 'disk-precopy' && p.disk.sentBytes > p.disk.totalBytes / 4, FIRST_PASS_LINK);
    case 'dirty-rounds':
      return phasePoint((p) => p.phase === 'disk-dirty-rounds');
    case 'memory-precopy':
      return phasePoint((p) => p.phase === 'memory-precopy');
    case 'before-pause':
      return hookPoint('switchover-before-pause');
    case 'after-pause':
      return hookPoint('switchover-after-pause');
    case 'after-prepared':
      return hookPoint('switchover-after-prepared');
    case 'after-commit':
      return hookPoint('switchover-after-commit');
    case 'postcopy':
      return postcopyPoint();
  }
}

function phasePoint(pred: (p: MigrationProgress) => boolean, bandwidth = SLOW_LINK): Point {
  return {
    bandwidth,
    arm: async () => undefined,
    reach: async (ctx) => {
      await waitProgress(ctx, pred);
      await sleep(300); // into the transfer, past its first heartbeat
    },
    // The rest of the migration needs no slow link.
    release: (ctx) => ctx.handle.setBandwidth(null).catch(() => undefined),
  };
}

function hookPoint(name: FaultPointName): Point {
  const file = (dir: string, suffix: string) => path.join(dir, `${name}.${suffix}`);
  return {
    bandwidth: null,
    arm: ({ faultDir }) => fs.writeFile(file(faultDir, 'arm'), ''),
    reach: (ctx) => waitFile(file(ctx.faultDir, 'reached'), ctx.signal, `fault point ${name}`),
    release: (ctx) => fs.writeFile(file(ctx.faultDir, 'release'), ''),
  };
}

/**
 * Inside the postcopy: the source's push holds with stale blocks still to send (a pause point, so the
 * fault strikes there however short the push would be), once the workflow is in its postcopy phase.
 * The guest's on-demand fetches go on meanwhile; the push goes on at the release.
 */
function postcopyPoint(): Point {
  const name: FaultPointName = 'postcopy-push';
  const hold = hookPoint(name);
  return {
    bandwidth: null,
    arm: hold.arm,
    reach: async (ctx) => {
      const reached = path.join(ctx.faultDir, `${name}.reached`);
      while (!(await fs.access(reached).then(() => true, () => false))) {
        const p = await ctx.handle.progress().catch(() => null);
        // Nothing stale at the freeze: the push never holds, and the cell says so instead of waiting.
        if (p && TERMINAL.includes(p.phase)) throw new PointMissed(`the migration ${p.phase} without a postcopy push to hold`);
        if (ctx.signal.aborted) throw new PointMissed(`fault point ${name} was not reached`);
        await sleep(100);
      }
      await waitProgress(ctx, (p) => p.phase === 'postcopy');
    },
    release: hold.release,
  };
}

const TERMINAL: readonly string[] = ['completed', 'rolled-back', 'failed'];

async function waitProgress(ctx: PointContext, pred: (p: MigrationProgress) => boolean): Promise<void> {
  let last: MigrationProgress | null = null;
  while (!ctx.signal.aborted) {
    last = await ctx.handle.progress().catch(() => last);
    if (last && pred(last)) return;
    if (last && TERMINAL.includes(last.phase)) break;
    await sleep(100);
  }
  throw new PointMissed(`the migration never reached the point (last phase ${last?.phase ?? 'unknown'})`);
}

async function waitFile(file: string, signal: AbortSignal, what: string): Promise<void> {
  while (!signal.aborted) {
    if (await fs.access(file).then(() => true, () => false)) return;
    await sleep(50);
  }
  throw new PointMissed(`${what} was not reached`);
}

export class PointMissed extends Error {}

export async function clearFaultPoints(dir: string): Promise<void> {
  for (const f of await fs.readdir(dir)) await fs.rm(path.join(dir, f), { force: true });
}
