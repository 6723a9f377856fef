// Guest throughput per workload with block-bitmap tracking off and on,
// measured on real VM processes:  npx tsx hypervisor/sim/bench-guest.ts [--seconds 2] [--disk-mib 256] [--memory-mib 64]
// A second table runs the same guest in this process (best of 3 alternating runs): on a busy machine it
// isolates the cost of tracking itself from scheduling noise.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { PAGE_BYTES, WORKLOADS, vmId, type Workload } from '../../common/types';
import type { VmSpec } from '../driver';
import { DirtyBitmap } from '../bitmap';
import { Guest, fdDisk, fillDisk } from './guest';
import { SimDriver } from './sim-driver';
import { setTimeout as sleep } from 'node:timers/promises';

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
}

async function guestRate(driver: SimDriver, workload: Workload, tracking: boolean, seconds: number, diskMiB: number, memMiB: number): Promise<number> {
  const id = vmId(`bench-${workload}-${tracking ? 'on' : 'off'}`);
  await driver.create({
    vmId: id,
    diskBytes: diskMiB << 20,
    memoryBytes: memMiB << 20,
    workload,
    seed: 1,
    opsPerSecond: 0,
    fill: workload === 'mixed' || workload === 'readmostly',
  });
  const h = await driver.start(id, { paused: true });
  try {
    if (tracking) {
      await h.addBitmap('bench', { blockBytes: 64 * 1024, persistent: true });
    }
    await h.resume();
    await sleep(300); // warm-up (JIT, page cache)
    const a = await h.status();
    const t0 = performance.now();
    await sleep(seconds * 1000);
    const b = await h.status();
    const rate = ((b.guest?.ops ?? 0) - (a.guest?.ops ?? 0)) / ((performance.now() - t0) / 1000);
    if (b.guest?.violations) throw new Error(`${workload}: ${b.guest.violations} read-check violations`);
    return rate;
  } finally {
    h.close();
    await driver.destroy(id);
  }
}

async function inProcessRates(dir: string, workload: Workload, diskMiB: number, memMiB: number): Promise<{ off: number; on: number }> {
  const spec: VmSpec = { vmId: vmId('bench'), diskBytes: diskMiB << 20, memoryBytes: memMiB << 20, workload, seed: 1, opsPerSecond: 0, fill: true };
  const file = await fs.promises.open(path.join(dir, `${workload}.img`), 'w+');
  try {
    await file.truncate(spec.diskBytes);
    await fillDisk(file, spec);
    const run = (tracking: boolean): number => {
      const bitmap = new DirtyBitmap(spec.diskBytes, 64 * 1024);
      const memLog = new DirtyBitmap(spec.memoryBytes, PAGE_BYTES);
      const hooks = tracking
        ? { beforeDiskWrite: (o: number, l: number) => bitmap.markWrite(o, l), onMemoryWrite: (o: number, l: number) => memLog.markWrite(o, l) }
        : {};
      const guest = new Guest(spec, Buffer.alloc(spec.memoryBytes), fdDisk(file.fd), hooks);
      guest.initMemory();
      const ops = workload === 'seqwrite' ? 2_000 : workload === 'idle' ? 2_000_000 : 200_000;
      const t0 = performance.now();
      guest.runSync(ops);
      return ops / ((performance.now() - t0) / 1000);
    };
    let off = 0;
    let on = 0;
    for (let i = 0; i < 3; i++) {
      off = Math.max(off, run(false));
      on = Math.max(on, run(true));
    }
    return { off, on };
  } finally {
    await file.close();
  }
}

async function main(): Promise<void> {
  const seconds = arg('seconds', 2);
  const diskMiB = arg('disk-mib', 256);
  const memMiB = arg('memory-mib', 64);
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-bench-guest-'));
  const driver = new SimDriver({ home });
  try {
    console.log(`guest ops/s on real VM processes (${diskMiB} MiB disk, ${memMiB} MiB memory, ${seconds} s per cell)`);
    console.log('workload      tracking off   tracking on (64 KiB bitmap)   cost');
    for (const w of WORKLOADS) {
      const off = await guestRate(driver, w, false, seconds, diskMiB, memMiB);
      const on = await guestRate(driver, w, true, seconds, diskMiB, memMiB);
      const cost = ((1 - on / off) * 100).toFixed(1);
      console.log(`${w.padEnd(12)}  ${Math.round(off).toString().padStart(12)}   ${Math.round(on).toString().padStart(11)}   ${cost.padStart(30)}%`);
    }
    console.log('\nsame guest in-process, best of 3 (ops/s)');
    console.log('workload      tracking off   tracking on   cost');
    for (const w of WORKLOADS) {
      const { off, on } = await inProcessRates(home, w, diskMiB, memMiB);
      const cost = ((1 - on / off) * 100).toFixed(1);
      console.log(`${w.padEnd(12)}  ${Math.round(off).toString().padStart(12)}   ${Math.round(on).toString().padStart(11)}   ${cost.padStart(5)}%`);
    }
  } finally {
    fs.rmSync(home, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
