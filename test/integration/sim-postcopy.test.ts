// Incoming / postcopy mode of real VM processes: stale blocks, BLOCK_NEEDED, deliveries, and the
// rules that keep a late delivery from overwriting a newer guest write.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { vmId, type Workload } from '../../common/types';
import type { BitmapSnapshot, DiskAccess, VmSpec } from '../../hypervisor/driver';
import { SimDriver, type SimVmHandle, blockContent, referenceRun } from '../../hypervisor';
import { BlockSet } from '../../hypervisor/bitmap';
import { setTimeout as sleep } from 'node:timers/promises';
import { carryMachineState } from '../support/carry-stream';

jest.setTimeout(120_000);

const homes: string[] = [];
const drivers: SimDriver[] = [];
const handles: SimVmHandle[] = [];
const disks: DiskAccess[] = [];

function host(): SimDriver {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-sim-post-'));
  homes.push(home);
  const d = new SimDriver({ home });
  drivers.push(d);
  return d;
}

afterAll(async () => {
  for (const h of handles) h.close();
  for (const disk of disks) await disk.close().catch(() => undefined);
  for (const d of drivers) {
    const dir = path.join(d.home, 'vms');
    for (const vm of fs.existsSync(dir) ? fs.readdirSync(dir) : []) await d.destroy(vmId(vm));
  }
  for (const h of homes) fs.rmSync(h, { recursive: true, force: true });
});

async function waitFor<T>(what: string, probe: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (ok(v)) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last value ${JSON.stringify(v)}`);
    await sleep(20);
  }
}

interface Postcopy {
  spec: VmSpec;
  src: SimVmHandle;
  dst: SimVmHandle;
  srcDisk: DiskAccess;
  dstDisk: DiskAccess;
  blockBytes: number;
  initialStale: BlockSet;
  dstDriver: SimDriver;
  deliver(blocks: number[]): Promise<number>;
}

/**
 * Source run to `ops` and halted; destination incoming with memory and CPU state copied and EVERY disk
 * block stale (its image is still all zeros): any disk access of the guest goes through postcopy.
 */
async function setUp(name: string, workload: Workload, blockBytes: number, ops: number, diskBytes = 4 * 1024 * 1024): Promise<Postcopy> {
  const spec: VmSpec = { vmId: vmId(name), diskBytes, memoryBytes: 256 * 1024, workload, seed: 3, opsPerSecond: 0, fill: true };
  const a = host();
  const b = host();
  await a.create(spec);
  await b.create(spec, { incoming: true });
  const src = await a.start(spec.vmId, { paused: true });
  const dst = await b.start(spec.vmId);
  handles.push(src, dst);
  await src.runUntil(ops);
  await carryMachineState(src, dst);
  const stale = new BlockSet(diskBytes, blockBytes);
  stale.addAll();
  const snap: BitmapSnapshot = { generation: 1, blockBytes, bits: Buffer.from(stale.bits), count: stale.size };
  await dst.setStale(snap);
  expect(await dst.staleBlocks()).toHaveLength(stale.size);
  const srcDisk = await src.openDisk();
  const dstDisk = await dst.openDisk();
  disks.push(srcDisk, dstDisk);
  const deliver = async (blocks: number[]): Promise<number> => {
    const items = [];
    for (const block of blocks) items.push({ block, data: await srcDisk.read(block * blockBytes, stale.blockLength(block)) });
    return dst.deliverBlocks(blockBytes, items);
  };
  return { spec, src, dst, srcDisk, dstDisk, blockBytes, initialStale: stale, dstDriver: b, deliver };
}

/** Guest counters and stale-block bookkeeping as the VM process reports them. */
async function vmState(h: SimVmHandle): Promise<{ state: string; ops: number; violations: number; staleBlocks: number; staleWaits: number }> {
  const [status, stale] = await Promise.all([h.status(), h.command('query-stale')]);
  return { state: status.state, ops: status.guest!.ops, violations: status.guest!.violations, staleBlocks: stale.ret.count as number, staleWaits: stale.ret.waits as number };
}

/** The source halted at `ops` and the halt travels with the CPU state: resume once (halted), then run on. */
async function runOn(dst: SimVmHandle): Promise<void> {
  await dst.resume();
  expect((await dst.status()).state).toBe('halted');
  await dst.resume();
}

/**
 * As runOn, but the guest leaves its halt with the next halt already set (run-until from halted), so
 * an unthrottled guest cannot run past `ops` before the target reaches it. Resolves at the halt.
 */
async function runTo(dst: SimVmHandle, ops: number): Promise<void> {
  await dst.resume();
  expect((await dst.status()).state).toBe('halted');
  await dst.runUntil(ops);
}

describe('incoming VM with stale blocks', () => {
  it('a read of a stale block waits, BLOCK_NEEDED fires once per block, a delivery wakes the guest with correct data', async () => {
    const p = await setUp('post-read', 'mixed', 64 * 1024, 3_000);
    const halted = runTo(p.dst, 12_000);
    halted.catch(() => undefined); // awaited below
    await waitFor('the guest to run', () => vmState(p.dst), (s) => s.state === 'running');
    await sleep(300);
    const stalled = await vmState(p.dst);
    expect(stalled.state).toBe('running');
    expect(stalled.ops).toBe(3_000); // the first operation waits for its block: the vCPU is stalled
    expect(stalled.staleWaits).toBe(1);

    const requested: number[] = [];
    let delivering = Promise.resolve();
    const off = p.dst.onBlockNeeded((block) => {
      requested.push(block);
      delivering = delivering.then(() => p.deliver([block]).then(() => undefined));
    });
    await waitFor('the guest to run on', () => vmState(p.dst), (s) => s.ops > 4_000);
    // Push the rest in the background, as the source would.
    const remaining = await p.dst.staleBlocks();
    await p.deliver(remaining);
    await halted;
    off();
    await delivering;

    const s = await vmState(p.dst);
    expect(s.violations).toBe(0);
    expect(s.staleBlocks).toBe(0);
    expect(s.staleWaits).toBeGreaterThan(1);
    expect(requested.length).toBeGreaterThan(1);
    expect(new Set(requested).size).toBe(requested.length); // once per block
    expect(await p.dst.staleBlocks()).toEqual([]);
    expect(await p.dst.hashes()).toEqual(await referenceRun(p.spec, 12_000, homes[0]));
  });

  it('a write covering a whole stale block makes it fresh; its late delivery is discarded', async () => {
    const p = await setUp('post-whole', 'randwrite', 4096, 2_000);
    await runTo(p.dst, 6_000); // 4 KiB writes over 4 KiB tracking blocks: never waits
    const s = await vmState(p.dst);
    expect(s.staleWaits).toBe(0);
    const stillStale = new Set(await p.dst.staleBlocks());
    expect(stillStale.size).toBeLessThan(p.initialStale.size);
    const written = [...Array(p.initialStale.blocks).keys()].filter((blk) => !stillStale.has(blk));
    expect(written.length).toBe(p.initialStale.size - stillStale.size);

    // The source's (older) copy arrives late: discarded, the guest's newer write stays.
    const victim = written[0];
    const older = await p.srcDisk.read(victim * 4096, 4096);
    expect(await p.deliver([victim])).toBe(0);
    const kept = await p.dstDisk.read(victim * 4096, 4096);
    let version = 1;
    while (version < 1_000 && !blockContent(p.spec.vmId, victim, version).equals(older)) version++;
    expect(kept.equals(older)).toBe(false);
    expect([1, 2, 3, 4].some((newer) => kept.equals(blockContent(p.spec.vmId, victim, version + newer)))).toBe(true);

    expect(await p.deliver([...stillStale])).toBe(stillStale.size);
    expect(await p.dst.staleBlocks()).toEqual([]);
    expect(await p.dst.hashes()).toEqual(await referenceRun(p.spec, 6_000, homes[0]));
  });

  it('a partial write to a stale block fetches it first; a whole write of the partial last block does not', async () => {
    const p = await setUp('post-partial', 'seqwrite', 1 << 20, 10, 4 * 1024 * 1024 + 1536);
    expect(p.initialStale.size).toBe(5);
    const requested: number[] = [];
    p.dst.onBlockNeeded((block) => {
      requested.push(block);
      void p.deliver([block]);
    });
    await runTo(p.dst, 200);
    const s = await vmState(p.dst);
    // Runs of 256 KiB partially cover the 1 MiB blocks 0-3: each is fetched before the write. The
    // last run writes the whole 1536-byte block 4: fresh without a fetch.
    expect(s.staleWaits).toBe(4);
    expect(s.staleBlocks).toBe(0);
    expect(requested.sort()).toEqual([0, 1, 2, 3]);
    expect(await p.deliver([0, 1, 4])).toBe(0); // late or duplicate deliveries are discarded
    expect(await p.dst.hashes()).toEqual(await referenceRun(p.spec, 200, homes[0]));
  });

  it('refuses stale marks outside the incoming state and deliveries that do not add up', async () => {
    const p = await setUp('post-bad', 'idle', 64 * 1024, 100);
    await expect(p.dst.deliverBlocks(64 * 1024, [{ block: 0, data: Buffer.alloc(100) }])).rejects.toThrow(/block 0 is 65536 bytes/);
    await expect(p.dst.deliverBlocks(4096, [{ block: 0, data: Buffer.alloc(4096) }])).rejects.toThrow(/deliver at that block size/);
    await expect(p.dst.deliverBlocks(64 * 1024, [{ block: 64, data: Buffer.alloc(65536) }])).rejects.toThrow(/"block"/);
    await runOn(p.dst);
    await expect(p.dst.setStale({ generation: 1, blockBytes: 65536, bits: Buffer.alloc(8), count: 0 })).rejects.toThrow(/InvalidState/);
    expect((await vmState(p.dst)).violations).toBe(0);
  });

  it('stale marks survive a clean stop of the destination; it cannot migrate on while blocks are stale', async () => {
    const p = await setUp('post-stop', 'readmostly', 64 * 1024, 500, 1024 * 1024);
    await runOn(p.dst);
    await sleep(100);
    await expect(p.dst.migrateOut({ downtimeLimitMs: 50, bandwidthBytesPerSecond: null, autoConverge: false })).rejects.toThrow(/16 blocks are still stale/);
    await p.dstDriver.stop(p.spec.vmId);
    const again = await p.dstDriver.start(p.spec.vmId, { paused: true });
    handles.push(again);
    expect(await vmState(again)).toMatchObject({ state: 'paused', ops: 500, staleBlocks: 16 });
    const items = [];
    for (let block = 0; block < 16; block++) items.push({ block, data: await p.srcDisk.read(block * 65536, 65536) });
    expect(await again.deliverBlocks(65536, items)).toBe(16);
    await again.runUntil(3_000);
    expect((await vmState(again)).violations).toBe(0);
    await again.endPostcopy();
    expect(await again.hashes()).toEqual(await referenceRun(p.spec, 3_000, homes[0]));
  });
});
