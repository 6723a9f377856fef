// The guest's own pace during a migration: its operation counter sampled from the VM process, and the
// rate it ran at during each disk round (what auto-converge's throttle did to it).
import { SimDriver } from '../hypervisor';
import { vmId as asVmId } from '../common/types';
import type { HistoryBreakdown } from './history';
import { setTimeout as sleep } from 'node:timers/promises';

export interface GuestSample {
  atMs: number;
  ops: number;
  throttle: number;
}

export interface GuestRound {
  round: number;
  blocks: number;
  /** Guest operations per second while the round ran (null: not sampled). */
  ops_per_second: number | null;
  /** The throttle fraction in force in the middle of the round. */
  throttle: number | null;
}

/** Samples the VM's counters every `everyMs` until stopped (or until its process is gone). */
export function sampleGuest(home: string, vmId: string, everyMs = 200): { stop(): Promise<GuestSample[]> } {
  const samples: GuestSample[] = [];
  let running = true;
  const loop = (async () => {
    const vm = await new SimDriver({ home }).attach(asVmId(vmId));
    try {
      while (running) {
        const s = await vm.status();
        samples.push({ atMs: Date.now(), ops: s.guest?.ops ?? 0, throttle: s.throttle });
        await sleep(everyMs);
      }
    } finally {
      vm.close();
    }
  })().catch(() => undefined); // the VM leaves the host at the end of the migration
  return {
    async stop() {
      running = false;
      await loop;
      return samples;
    },
  };
}

/** The guest's counter at time t, interpolated between the samples around it (null outside them). */
function opsAt(samples: GuestSample[], t: number): number | null {
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1];
    const b = samples[i];
    if (t >= a.atMs && t <= b.atMs) return a.ops + ((b.ops - a.ops) * (t - a.atMs)) / Math.max(1, b.atMs - a.atMs);
  }
  return null;
}

export function guestRounds(samples: GuestSample[], steps: HistoryBreakdown['steps']): GuestRound[] {
  return steps
    .filter((s) => s.type === 'copyDiskDirty')
    .map((s, i) => {
      const [from, to] = [opsAt(samples, s.startedAtMs), opsAt(samples, s.startedAtMs + s.ms)];
      const middle = s.startedAtMs + s.ms / 2;
      const nearest = samples.reduce<GuestSample | null>((best, x) => (best && Math.abs(best.atMs - middle) <= Math.abs(x.atMs - middle) ? best : x), null);
      return {
        round: i + 1,
        blocks: s.items ?? 0,
        ops_per_second: from === null || to === null || s.ms <= 0 ? null : Math.round(((to - from) * 1000) / s.ms),
        throttle: nearest ? Math.round(nearest.throttle * 100) / 100 : null,
      };
    });
}

/** "16384 blk @ 41000 ops/s, ... 7097 blk @ 8200 ops/s (throttle 0.8)": what each round found and how fast the guest ran. */
export function formatGuestRounds(rounds: GuestRound[]): string {
  return rounds
    .map((g) => `${g.blocks} blk @ ${g.ops_per_second ?? '?'} ops/s${g.throttle ? ` (throttle ${g.throttle})` : ''}`)
    .join(', ');
}
