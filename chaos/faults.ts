// The faults of the failure table (DESIGN.md), each injected into real processes: agents killed with
// SIGKILL, the Temporal server killed and restarted on its SQLite file, the data-plane link cut or a
// frame corrupted by the proxy, and a destination host lost for good.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { ChaosEnv } from './env';
import { setTimeout as sleep } from 'node:timers/promises';

export const FAULTS = ['kill-source', 'kill-dest', 'restart-temporal', 'cut-link', 'corrupt-frame', 'lose-dest'] as const;
export type FaultName = (typeof FAULTS)[number];

export interface FaultContext {
  env: ChaosEnv;
  source: string;
  dest: string;
}

export interface Fault {
  /** Before the point is released: the fault strikes while the migration is held there. */
  inject(ctx: FaultContext): Promise<string>;
  /** After the release: wait for what the fault needs (a frame to corrupt); a note, or a problem if it did not happen. */
  settle(ctx: FaultContext, signal: AbortSignal): Promise<{ note?: string; problem?: string }>;
}

const RESTART_AFTER_MS = 1000;
const LINK_DOWN_MS = 2000;

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
        async inject({ env, dest }) {
          const n = env.proxies.get(dest)!.cut(LINK_DOWN_MS);
          return `cut ${n} data-plane connection(s) to ${dest}; link down for ${LINK_DOWN_MS} ms`;
        },
        settle: async () => ({}),
      };
    case 'corrupt-frame': {
      const refusals = async (env: ChaosEnv, dest: string) =>
        (await fs.readFile(path.join(env.cluster.home(dest), 'agent.log'), 'utf8').catch(() => '')).split('corrupt data-plane frame refused').length - 1;
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
          const vms = await env.cluster.vmProcesses(dest);
          for (const { pid } of vms) process.kill(pid, 'SIGKILL');
          await fs.rm(env.cluster.home(dest), { recursive: true, force: true });
          return `host ${dest} lost: agent and ${vms.length} VM process(es) killed, its directory removed`;
        },
        settle: async () => ({}),
      };
  }
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
