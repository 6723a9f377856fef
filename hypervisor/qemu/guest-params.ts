// The kernel command line that tells Ferry's guest program what to run (guest/PROTOCOL.md,
// "Parameters").
import { WORKLOADS, type Workload } from '../../common/types';
import { MAX_GUEST_SEED } from './guest-content';

/** The simulator's workloads, memhog included (it dirties memory pages, no disk I/O). */
export type GuestWorkload = Workload;
export const GUEST_WORKLOADS: readonly GuestWorkload[] = WORKLOADS;
/** ops/s a workload runs at when no rate is given (seqwrite: 256 KiB per op; memhog: one page per op). */
export const DEFAULT_GUEST_RATES: Readonly<Record<GuestWorkload, number>> = {
  idle: 0,
  seqwrite: 20,
  randwrite: 200,
  mixed: 200,
  readmostly: 200,
  memhog: 1000,
};

export interface GuestParams {
  seed: number;
  workload: GuestWorkload;
  /** ops/s, 0 = as fast as it can; default DEFAULT_GUEST_RATES[workload]. */
  rate?: number;
  /** The disk holds version 1 of every block (fillImage). */
  fill?: boolean;
  /** Rebuild the version table from the disk's block headers (after a reboot). */
  rescan?: boolean;
  heartbeatMs?: number;
  /** I/Os slower than this count as slow (default 50). */
  slowMs?: number;
  /** memhog's region (default 16 MiB). */
  memhogMib?: number;
}

/** Console on ttyS0, no reboot on a panic (QEMU runs with -no-reboot and exits), then ferry.* parameters. */
export function guestKernelCmdline(p: GuestParams): string {
  const whole = (name: string, v: number, min: number, max: number): number => {
    if (!Number.isInteger(v) || v < min || v > max) throw new RangeError(`${name} ${v}: use a whole number from ${min} to ${max}`);
    return v;
  };
  if (!GUEST_WORKLOADS.includes(p.workload)) throw new RangeError(`workload ${JSON.stringify(p.workload)}: use one of ${GUEST_WORKLOADS.join(', ')}`);
  const parts = ['console=ttyS0', 'panic=-1', 'quiet', `ferry.seed=${whole('seed', p.seed, 0, MAX_GUEST_SEED)}`, `ferry.workload=${p.workload}`];
  if (p.rate !== undefined) parts.push(`ferry.rate=${whole('rate', p.rate, 0, 10_000_000)}`);
  if (p.fill !== undefined) parts.push(`ferry.fill=${p.fill ? 1 : 0}`);
  if (p.rescan !== undefined) parts.push(`ferry.rescan=${p.rescan ? 1 : 0}`);
  if (p.heartbeatMs !== undefined) parts.push(`ferry.heartbeat_ms=${whole('heartbeatMs', p.heartbeatMs, 1, 1000)}`);
  if (p.slowMs !== undefined) parts.push(`ferry.slow_ms=${whole('slowMs', p.slowMs, 1, 600_000)}`);
  if (p.memhogMib !== undefined) parts.push(`ferry.memhog_mib=${whole('memhogMib', p.memhogMib, 1, 65_536)}`);
  return parts.join(' ');
}
