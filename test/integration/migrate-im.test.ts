// Incremental migration: moving a VM back sends only the blocks written since, onto the base the
// first migration left behind; every reason to fall back to a full copy is caused and reported.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { useCluster, testVm, expectGuestCorrect as guestCorrect, type TestVm, uniqueHosts } from '../support/cluster';
import type { MigrateVmInput, MigrationReport } from '../../common/migration';

const [a, b, c] = uniqueHosts('a', 'b', 'c');
jest.setTimeout(300_000);

const t = useCluster([a, b, c]);

async function migrate(vm: TestVm, from: string, to: string, extra: Partial<MigrateVmInput> = {}): Promise<MigrationReport> {
  const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: from, destinationHosts: [to], ...extra });
  return handle.result();
}

const expectGuestCorrect = (host: string, vm: TestVm) => guestCorrect(t.ferry, host, vm);

const diskOf = (host: string, vmId: string) => path.join(t.cluster.home(host), 'vms', vmId, 'disk.img');

/** Tracking blocks whose contents differ between two images. */
async function differingBlocks(fileA: string, fileB: string, blockBytes: number): Promise<number> {
  const [x, y] = await Promise.all([fs.readFile(fileA), fs.readFile(fileB)]);
  let n = 0;
  for (let off = 0; off < x.length; off += blockBytes) {
    if (!x.subarray(off, off + blockBytes).equals(y.subarray(off, off + blockBytes))) n++;
  }
  return n;
}

it('moving back sends exactly the blocks written since, plus memory', async () => {
  const vm = testVm('randwrite', { opsPerSecond: 2000 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const first = await migrate(vm, a, b);
  expect(first).toMatchObject({ outcome: 'completed', incremental: false });
  expect(first.incrementalFallbackReason).toMatch(/no write-tracking bitmap/);
  expect((await t.ferry.hostCommand(a, 'baseList')).map((b) => b.vmId)).toContain(vm.vmId);

  // The guest writes on b, then pauses: nothing changes during the migration back (a cold migration).
  await new Promise((r) => setTimeout(r, 200));
  const pausedOnB = await t.ferry.hostCommand(b, 'vmPause', { vmId: vm.vmId });
  const written = await differingBlocks(diskOf(a, vm.vmId), diskOf(b, vm.vmId), 65536);
  expect(written).toBeGreaterThan(0);

  const back = await migrate(vm, b, a);
  expect(back).toMatchObject({ outcome: 'completed', incremental: true });
  const blocks = vm.diskBytes / 65536;
  expect(back.skippedBlocks).toBe(blocks - written);
  expect(back.diskBytesSent).toBe(written * 65536);
  expect(back.memoryBytesSent).toBeGreaterThanOrEqual(vm.memoryBytes);
  expect(back.diskBytesSent).toBeLessThan(first.diskBytesSent);
  // Paused before the migration, paused after it.
  await new Promise((r) => setTimeout(r, 300));
  expect(await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).toMatchObject({ state: 'paused', guest: { ops: pausedOnB.guest!.ops } });
  await expectGuestCorrect(a, vm);
});

it('a chain a→b→a→b→a under randwrite stays byte-identical to the reference run', async () => {
  const vm = testVm('randwrite', { opsPerSecond: 1000 });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const hops: [string, string][] = [[a, b], [b, a], [a, b], [b, a]];
  const reports: MigrationReport[] = [];
  for (const [from, to] of hops) reports.push(await migrate(vm, from, to));
  expect(reports.map((r) => r.outcome)).toEqual(['completed', 'completed', 'completed', 'completed']);
  expect(reports.map((r) => r.incremental)).toEqual([false, true, true, true]);
  await expectGuestCorrect(a, vm);
});

describe('falls back to a full copy and says why', () => {
  it('on a third host without a base, and on a lineage mismatch', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 500 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await migrate(vm, a, b);
    const toC = await migrate(vm, b, c);
    expect(toC).toMatchObject({ outcome: 'completed', incremental: false });
    expect(toC.incrementalFallbackReason).toMatch(/holds no base/);
    // a holds the base of a→b, but c's bitmap starts at b→c
    const toA = await migrate(vm, c, a);
    expect(toA).toMatchObject({ outcome: 'completed', incremental: false });
    expect(toA.incrementalFallbackReason).toMatch(/lineage mismatch/);
    await expectGuestCorrect(a, vm);
  });

  it('when the base was tampered with (one byte)', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 500 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await migrate(vm, a, b);
    const fh = await fs.open(diskOf(a, vm.vmId), 'r+');
    const byte = Buffer.alloc(1);
    await fh.read(byte, 0, 1, 12345);
    byte[0] ^= 0xff;
    await fh.write(byte, 0, 1, 12345);
    await fh.close();
    const back = await migrate(vm, b, a);
    expect(back).toMatchObject({ outcome: 'completed', incremental: false });
    expect(back.incrementalFallbackReason).toMatch(/digest does not match/);
    await expectGuestCorrect(a, vm);
  });

  it('when the block size changed', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 500 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await migrate(vm, a, b);
    const back = await migrate(vm, b, a, { blockBytes: 32768 });
    expect(back).toMatchObject({ outcome: 'completed', incremental: false });
    expect(back.incrementalFallbackReason).toMatch(/block size changed/);
    await expectGuestCorrect(a, vm);
  });

  it('when the bitmap is invalid after a kill -9 of the VM process', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 500 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await migrate(vm, a, b);
    const proc = (await t.cluster.vmProcesses(b)).find((p) => p.vmId === vm.vmId)!;
    process.kill(proc.pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 500));
    await t.ferry.hostCommand(b, 'vmStart', { vmId: vm.vmId });
    const back = await migrate(vm, b, a);
    expect(back).toMatchObject({ outcome: 'completed', incremental: false });
    expect(back.incrementalFallbackReason).toMatch(/invalid after an unclean stop/);
    const after = await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId });
    expect(after.guest?.violations).toBe(0);
  });

  it("with incremental 'off', and refuses with 'require' when it is not possible", async () => {
    const vm = testVm('randwrite', { opsPerSecond: 500 });
    await t.ferry.hostCommand(a, 'vmCreate', vm);
    await migrate(vm, a, b);
    const off = await migrate(vm, b, a, { incremental: 'off' });
    expect(off).toMatchObject({ outcome: 'completed', incremental: false });
    expect(off.incrementalFallbackReason).toMatch(/turned off/);
    const required = await migrate(vm, a, c, { incremental: 'require' });
    expect(required.outcome).toBe('rolled-back');
    expect(required.reason).toMatch(/incremental migration required but not possible: this host holds no base/);
    await expectGuestCorrect(a, vm);
  });
});

it('lists and deletes bases; without its base the way back is a full copy', async () => {
  const vm = testVm('idle');
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  await migrate(vm, a, b);
  const bases = await t.ferry.hostCommand(a, 'baseList');
  expect(bases.find((b) => b.vmId === vm.vmId)).toMatchObject({ diskBytes: vm.diskBytes, blockBytes: 65536, inUseBy: null });
  await t.ferry.hostCommand(a, 'baseDelete', { vmId: vm.vmId });
  expect((await t.ferry.hostCommand(a, 'baseList')).map((b) => b.vmId)).not.toContain(vm.vmId);
  await expect(t.ferry.hostCommand(a, 'baseDelete', { vmId: vm.vmId })).rejects.toThrow(/holds no base/);
  // with the base gone, the way back is a full copy
  const back = await migrate(vm, b, a);
  expect(back.incremental).toBe(false);
});
