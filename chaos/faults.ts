// The faults of the failure table (DESIGN.md), each injected into real processes: agents killed with
// SIGKILL, the Temporal server killed and restarted on its SQLite file, the data-plane link cut or a
// frame corrupted by the proxy, and a destination host lost for good. With hosts in network
// namespaces (--net netns) links are cut in the kernel, and partitions join the list: a host cut off
// from Temporal with its data plane up, and the data plane cut with both hosts on Temporal.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { processesUnder } from './checks';
import type { ChaosEnv } from './env';
import type { MigrationHandle } from '../client/ferry-client';
import { setTimeout as sleep } from 'node:timers/promises';

export const FAULTS = ['kill-source', 'kill-dest', 'restart-temporal', 'cut-link', 'corrupt-frame', 'lose-dest'] as const;
/** Faults that need hosts on networks of their own (chaos --net netns). */
export const NET_FAULTS = ['isolate-source', 'isolate-dest', 'partition-dataplane'] as const;
export type FaultName = (typeof FAULTS)[number] | (typeof NET_FAULTS)[number];
export const ALL_FAULTS: readonly FaultName[] = [...FAULTS, ...NET_FAULTS];

export interface FaultContext {
  env: ChaosEnv;
  source: string;
  dest: string;
  /** The point is at or after the commit. */
  afterCommit: boolean;
  /** The migration's destinationDeadlineSeconds. */
  deadlineSeconds: number;
  /** The migration, to follow its progress while a fault lasts. */
  handle: MigrationHandle;
}

/** Why a fault cannot be injected in this environment, or null. */
export function unsupported(name: FaultName, env: ChaosEnv): string | null {
  if ((NET_FAULTS as readonly string[]).includes(name) && !env.net) return 'needs hosts in network namespaces (--net netns)';
  if (name === 'corrupt-frame' && env.net) return 'the frame-corrupting proxy sits on loopback only (run without --net netns)';
  return null;
}

export interface Fault {
  /** Before the point is released: the fault strikes while the migration is held there. */
  inject(ctx: FaultContext): Promise<string>;
  /** After the release: wait for what the fault needs (a frame to corrupt); a note, or a problem if it did not happen. */
  settle(ctx: FaultContext, signal: AbortSignal): Promise<{ note?: string; problem?: string }>;
}

const RESTART_AFTER_MS = 1000;
const LINK_DOWN_MS = 2000;
/** How long a host stays cut off from Temporal. */
const ISOLATED_MS = 10_000;
/** After the commit, how long the data plane stays cut (the migration must wait, then complete). */
const PARTITION_AFTER_COMMIT_MS = 15_000;
/** Before the commit: the rollback may take this much past the destination deadline (retry and heartbeat granularity, the fence). */
export const ROLLBACK_SLACK_MS = 15_000;

export function fault(name: FaultName): Fault {
  switch (name) {
    case 'kill-source':
      return restartAgent((c) => c.source);
    case 'kill-dest':
      return restartAgent((c) => c.dest);
    case 'restart-temporal':
      return {
        async inject({ env }) {
          if (!env.temporal.restart) throw new Error('the Temporal server of this run is shared: it cannot be restarted');
          await env.temporal.restart(RESTART_AFTER_MS);
          return 'Temporal server killed (SIGKILL) and restarted on its SQLite file';
        },
        settle: async () => ({}),
      };
    case 'cut-link':
      return {
        async inject({ env, source, dest }) {
          if (env.net) {
            await env.net.cutDataPlane(source, dest);
            setTimeout(() => void env.net?.restoreDataPlane(source, dest).catch(() => undefined), LINK_DOWN_MS);
            return `routes between ${source} and ${dest} cut (blackhole) for ${LINK_DOWN_MS} ms`;
          }
          const n = env.proxies.get(dest)!.cut(LINK_DOWN_MS);
          return `cut ${n} data-plane connection(s) to ${dest}; link down for ${LINK_DOWN_MS} ms`;
        },
        settle: async () => ({}),
      };
    case 'isolate-source':
      return isolate((c) => c.source);
    case 'isolate-dest':
      return isolate((c) => c.dest);
    case 'partition-dataplane':
      return partitionDataPlane();
    case 'corrupt-frame': {
      const refusals = async (env: ChaosEnv, dest: string) =>
        (await fs.readFile(env.cluster.logFile(dest), 'utf8').catch(() => '')).split('corrupt data-plane frame refused').length - 1;
      let before = 0;
      return {
        async inject({ env, dest }) {
          before = await refusals(env, dest);
          env.proxies.get(dest)!.corruptNextFrame();
          return `next message frame to ${dest} will carry one flipped byte`;
        },
        async settle({ env, dest }, signal) {
          const proxy = env.proxies.get(dest)!;
          while (proxy.corruptPending && !signal.aborted) await sleep(50);
          if (proxy.corruptPending) return { problem: 'no message frame went to the destination after the point: nothing was corrupted' };
          // The receiver must have caught it by its frame CRC, not applied it.
          for (let i = 0; i < 100 && !signal.aborted; i++) {
            if ((await refusals(env, dest)) > before) return { note: 'the corrupted frame was refused by the receiver (frame CRC)' };
            await sleep(100);
          }
          return { problem: 'the receiver did not report the corrupted frame' };
        },
      };
    }
    case 'lose-dest':
      return {
        async inject({ env, dest }) {
          await env.cluster.killAgent(dest, 'SIGKILL');
          // Everything the host ran dies with it: VM processes, and helpers such as QEMU's postcopy disk server.
          const procs = await processesUnder(`${env.cluster.home(dest)}${path.sep}`);
          for (const { pid } of procs) {
            try {
              process.kill(pid, 'SIGKILL');
            } catch {
              // gone already
            }
          }
          await fs.rm(env.cluster.home(dest), { recursive: true, force: true });
          return `host ${dest} lost: agent and ${procs.length} other process(es) killed, its directory removed`;
        },
        settle: async () => ({}),
      };
  }
}

/** A host cut off from Temporal (both ways) for a while; its data plane to the other host stays up. */
function isolate(which: (c: FaultContext) => string): Fault {
  let since = 0;
  return {
    async inject(ctx) {
      const host = which(ctx);
      await ctx.env.net!.isolateFromTemporal(host);
      since = Date.now();
      return `${host} cut off from Temporal (data plane up) for ${ISOLATED_MS / 1000} s`;
    },
    async settle(ctx, signal) {
      await sleep(Math.max(0, since + ISOLATED_MS - Date.now()), undefined, { signal }).catch(() => undefined);
      await ctx.env.net!.rejoinTemporal(which(ctx));
      return { note: `${which(ctx)} back on Temporal after ${((Date.now() - since) / 1000).toFixed(1)} s` };
    },
  };
}

/**
 * The data plane between source and destination cut, both hosts staying on Temporal. Before the
 * commit the migration must roll back within the destination deadline (the link comes back once it
 * has); after it, the link comes back after a while and the migration must complete.
 */
function partitionDataPlane(): Fault {
  let since = 0;
  return {
    async inject({ env, source, dest }) {
      await env.net!.cutDataPlane(source, dest);
      since = Date.now();
      return `data plane between ${source} and ${dest} cut (both on Temporal)`;
    },
    async settle(ctx, signal) {
      const restore = () => ctx.env.net!.restoreDataPlane(ctx.source, ctx.dest);
      if (ctx.afterCommit) {
        await sleep(PARTITION_AFTER_COMMIT_MS, undefined, { signal }).catch(() => undefined);
        const phase = (await ctx.handle.progress().catch(() => null))?.phase;
        await restore();
        if (phase === 'completed') return { problem: 'the migration completed while its data plane was cut after the commit: the stale blocks cannot have moved' };
        return { note: `link restored after ${PARTITION_AFTER_COMMIT_MS / 1000} s (phase then: ${phase ?? 'unknown'})` };
      }
      const limit = ctx.deadlineSeconds * 1000 + ROLLBACK_SLACK_MS;
      let phase: string | undefined;
      while (!signal.aborted && Date.now() - since < limit + 60_000) {
        phase = (await ctx.handle.progress().catch(() => null))?.phase;
        if (phase === 'rolling-back' || phase === 'rolled-back' || phase === 'completed') break;
        await sleep(250);
      }
      const took = Date.now() - since;
      await restore();
      const note = `rollback began ${(took / 1000).toFixed(1)} s after the cut (deadline ${ctx.deadlineSeconds} s)`;
      if (phase !== 'rolling-back' && phase !== 'rolled-back') return { problem: `the migration did not roll back while its data plane was cut (phase ${phase ?? 'unknown'})` };
      if (took > limit) return { problem: `${note}: more than the deadline + ${ROLLBACK_SLACK_MS / 1000} s` };
      return { note };
    },
  };
}

function restartAgent(which: (c: FaultContext) => string): Fault {
  return {
    async inject(ctx) {
      const host = which(ctx);
      const pid = ctx.env.cluster.agents.get(host)?.process.pid;
      await ctx.env.cluster.killAgent(host, 'SIGKILL');
      await sleep(RESTART_AFTER_MS);
      await ctx.env.cluster.startAgent(host);
      return `agent of ${host} (pid ${pid}) killed with SIGKILL and restarted`;
    },
    settle: async () => ({}),
  };
}
