// The guest oracle through real VM processes: a VM driven to N operations has the disk and memory of a
// reference run, with or without halts and with a machine-state stream into a second VM in between.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { vmId, type Workload } from '../../common/types';
import type { VmSpec } from '../../hypervisor/driver';
import { SimDriver, type SimVmHandle, referenceRun } from '../../hypervisor';
import { setBits } from '../../hypervisor/bitmap';
import { setTimeout as sleep } from 'node:timers/promises';
import { carryMachineState } from '../support/carry-stream';

jest.setTimeout(120_000);

const homes: string[] = [];
const drivers: SimDriver[] = [];
const handles: SimVmHandle[] = [];
let scratch: string;

function host(): SimDriver {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-sim-oracle-'));
  homes.push(home);
  const d = new SimDriver({ home });
  drivers.push(d);
  return d;
}

beforeAll(() => {
  scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-sim-ref-'));
  homes.push(scratch);
});

afterAll(async () => {
  for (const h of handles) h.close();
  for (const d of drivers) {
    const dir = path.join(d.home, 'vms');
    for (const vm of fs.existsSync(dir) ? fs.readdirSync(dir) : []) await d.destroy(vmId(vm));
  }
  for (const h of homes) fs.rmSync(h, { recursive: true, force: true });
});

const cases: { workload: Workload; ops: number; fill: boolean; diskBytes: number }[] = [
  { workload: 'idle', ops: 20_000, fill: false, diskBytes: 1 << 20 },
  { workload: 'seqwrite', ops: 400, fill: false, diskBytes: 8 * 1024 * 1024 + 1536 },
  { workload: 'randwrite', ops: 20_000, fill: false, diskBytes: 8 * 1024 * 1024 + 1536 },
  { workload: 'mixed', ops: 20_000, fill: true, diskBytes: 8 * 1024 * 1024 },
  { workload: 'readmostly', ops: 20_000, fill: true, diskBytes: 4 * 1024 * 1024 + 512 },
];

describe('runUntil + hashes equal the reference run', () => {
  const driver = (): SimDriver => drivers[0] ?? host();

  it.each(cases)('$workload', async ({ workload, ops, fill, diskBytes }) => {
    const spec: VmSpec = { vmId: vmId(`ref-${workload}`), diskBytes, memoryBytes: 512 * 1024, workload, seed: 11, opsPerSecond: 0, fill };
    const d = driver();
    await d.create(spec);
    const h = await d.start(spec.vmId, { paused: true });
    handles.push(h);
    expect((await h.status()).guest!.ops).toBe(0);
    await h.runUntil(Math.floor(ops / 3)); // a halt in the middle must not change anything
    expect((await h.status()).state).toBe('halted');
    await h.runUntil(ops);
    const status = await h.status();
    expect(status).toMatchObject({ state: 'halted', guest: { ops, violations: 0 } });
    expect(await h.hashes()).toEqual(await referenceRun(spec, ops, scratch));
  });
});

describe('a machine-state stream into a second (incoming) VM', () => {
  it('a live copy with bitmap rounds and the stream, then both VMs run on: both equal the reference', async () => {
    const spec: VmSpec = {
      vmId: vmId('mig1'),
      diskBytes: 16 * 1024 * 1024,
      memoryBytes: 1024 * 1024,
      workload: 'mixed',
      seed: 5,
      opsPerSecond: 20_000,
      fill: true,
    };
    const blockBytes = 64 * 1024;
    const a = host();
    const b = host();
    await a.create(spec);
    await b.create(spec, { incoming: true });
    const src = await a.start(spec.vmId);
    const dst = await b.start(spec.vmId);
    handles.push(src, dst);
    expect((await dst.status()).state).toBe('incoming');
    await expect(dst.resume()).rejects.toThrow(/machine-state stream is loaded/);

    await src.addBitmap('mig', { blockBytes, persistent: false });
    const sdisk = await src.openDisk();
    const ddisk = await dst.openDisk();
    const copyBlocks = async (blocks: number[]): Promise<void> => {
      for (const blk of blocks) {
        const off = blk * blockBytes;
        const len = Math.min(blockBytes, spec.diskBytes - off);
        await ddisk.write(off, await sdisk.read(off, len));
      }
    };

    // Disk: full pass while the guest writes, then dirty rounds.
    await copyBlocks([...Array(Math.ceil(spec.diskBytes / blockBytes)).keys()]);
    for (let round = 0; round < 3; round++) {
      const snap = await src.snapshotBitmap('mig');
      await copyBlocks(setBits(snap.bits));
      await src.ackBitmap('mig', snap.generation);
    }
    // Memory and CPU state: the hypervisor's stream; the last disk round while it holds the guest paused.
    let atSwitch = 0;
    const done = await carryMachineState(src, dst, {
      atSwitchover: async () => {
        expect((await src.status()).state).toBe('paused');
        const lastDisk = await src.snapshotBitmap('mig');
        await copyBlocks(setBits(lastDisk.bits));
        await src.ackBitmap('mig', lastDisk.generation);
        await ddisk.flush();
        atSwitch = (await src.status()).guest!.ops;
      },
    });
    expect(done).toMatchObject({ status: 'completed', iterations: expect.any(Number) as number });
    expect(done.downtimeMs).not.toBeNull();
    expect((await src.status()).state).toBe('migrated');
    expect(await dst.hashes()).toEqual(await src.hashes());
    const paused = Date.now();
    await dst.resume();
    expect(await dst.nextHeartbeat(paused, 5_000)).toBeGreaterThanOrEqual(paused);
    await sleep(50);
    expect((await dst.status()).guest!.ops).toBeGreaterThan(atSwitch);
    await sdisk.close();
    await ddisk.close();

    // Both continue (as after a rollback) to the same count: both equal the run without migration.
    const target = atSwitch + 5_000;
    await src.resume();
    await Promise.all([src.runUntil(target), dst.runUntil(target)]);
    const ref = await referenceRun({ ...spec, opsPerSecond: 0 }, target, fs.mkdtempSync(path.join(scratch, 'r')));
    expect(await src.hashes()).toEqual(ref);
    expect(await dst.hashes()).toEqual(ref);
    expect((await src.status()).guest!.violations).toBe(0);
    expect((await dst.status()).guest!.violations).toBe(0);
  });
});
