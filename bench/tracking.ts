// The cost of recording writes: the same deterministic guest run in this process with tracking off
// and on (a 64 KiB block-bitmap plus the memory dirty log, the hooks a VM process installs), in
// alternating runs so that machine noise hits both sides alike. Same logic as
// hypervisor/sim/bench-guest.ts (in-process table); in a VM process the hooks are the same calls.
// Rates are per second of this process's CPU time (user + system): on a machine shared with other
// work, wall time mostly measures the scheduler; CPU time measures the guest's own work.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { PAGE_BYTES, vmId, type Workload } from '../common/types';
import type { VmSpec } from '../hypervisor/driver';
import { DirtyBitmap } from '../hypervisor/bitmap';
import { Guest, fdDisk, fillDisk } from '../hypervisor/sim/guest';
import { median } from './stats';

export interface TrackingResult {
  workload: Workload;
  /** Guest operations per CPU-second, one sample per run. */
  offOpsPerSec: number[];
  onOpsPerSec: number[];
  /** The same runs per wall-clock second. */
  offOpsPerWallSec: number[];
  onOpsPerWallSec: number[];
  /** 1 - median(on/off) over the alternating pairs: 0.01 means writes cost 1% more with tracking. */
  overhead: number;
}

export async function measureTracking(dir: string, workload: Workload, diskBytes: number, memoryBytes: number, pairs: number, opsPerRun: number): Promise<TrackingResult> {
  const spec: VmSpec = { vmId: vmId('bench-tracking'), diskBytes, memoryBytes, workload, seed: 1, opsPerSecond: 0, fill: true };
  const file = await fs.open(path.join(dir, `tracking-${workload}.img`), 'w+');
  try {
    await file.truncate(diskBytes);
    await fillDisk(file, spec);
    const memory = Buffer.alloc(memoryBytes);
    const runOnce = (tracking: boolean): { cpu: number; wall: number } => {
      const bitmap = new DirtyBitmap(diskBytes, 64 * 1024);
      const memLog = new DirtyBitmap(memoryBytes, PAGE_BYTES);
      const hooks = tracking
        ? { beforeDiskWrite: (o: number, l: number) => bitmap.markWrite(o, l), onMemoryWrite: (o: number, l: number) => memLog.markWrite(o, l) }
        : {};
      const guest = new Guest(spec, memory, fdDisk(file.fd), hooks);
      guest.initMemory();
      const t0 = performance.now();
      const c0 = process.cpuUsage();
      guest.runSync(opsPerRun);
      const c = process.cpuUsage(c0);
      return { cpu: opsPerRun / ((c.user + c.system) / 1e6), wall: opsPerRun / ((performance.now() - t0) / 1000) };
    };
    runOnce(false); // warm-up: JIT and page cache
    const off: { cpu: number; wall: number }[] = [];
    const on: { cpu: number; wall: number }[] = [];
    const ratios: number[] = [];
    for (let i = 0; i < pairs; i++) {
      // Alternate which side goes first, so a drift in machine speed does not favour one.
      const offFirst = i % 2 === 0;
      const a = runOnce(!offFirst);
      const b = runOnce(offFirst);
      const [offRate, onRate] = offFirst ? [a, b] : [b, a];
      off.push(offRate);
      on.push(onRate);
      ratios.push(onRate.cpu / offRate.cpu);
    }
    return {
      workload,
      offOpsPerSec: off.map((x) => x.cpu),
      onOpsPerSec: on.map((x) => x.cpu),
      offOpsPerWallSec: off.map((x) => x.wall),
      onOpsPerWallSec: on.map((x) => x.wall),
      overhead: 1 - median(ratios),
    };
  } finally {
    await file.close();
    await fs.rm(path.join(dir, `tracking-${workload}.img`), { force: true });
  }
}
