// The source disk's dirty-bitmap rounds (DESIGN.md, "QEMU driver"), proven at the protocol level
// with Ferry's QMP and NBD clients on a guest-less QEMU: a writable NBD export stands in for the
// guest and keeps writing while the rounds rotate by `transaction` {add next, disable current};
// each finished round is exported read-only with its bitmap and read with BLOCK_STATUS
// qemu:dirty-bitmap:NAME; one round takes the retry path (merge into the next, remove). Every
// write must land in exactly one round, in the one its timing allows, and copying the rounds'
// dirty clusters onto an empty disk must give the disk back.
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import type { QmpClient } from '../../hypervisor/qemu/qmp/client';
import { QmpCommandError } from '../../hypervisor/qemu/qmp/errors';
import { NbdClient } from '../../nbd/client';
import { BASE_ALLOCATION, DIRTY, State } from '../../nbd/protocol';
import { describeWithTools, Peers } from '../support/peers';
import { rejection } from '../support/assertions';

jest.setTimeout(120_000);

const MiB = 1 << 20;
const SIZE = 64 * MiB;
const GRANULARITY = 64 * 1024;
const CLUSTERS = SIZE / GRANULARITY;
const ROUNDS = 6;
const WRITES_PER_ROUND = 60;
const RETRIED_ROUND = 3;

interface Write {
  cluster: number;
  offset: number;
  issued: number;
  acked: number;
}

/** A reproducible sequence in [0, 1) (the write order and offsets). */
function seeded(seed: number): () => number {
  let x = seed >>> 0;
  return () => ((x = (Math.imul(x, 1664525) + 1013904223) >>> 0) / 2 ** 32);
}

describeWithTools('dirty-bitmap rounds on a QEMU block node', ['qemu-system-x86_64'], () => {
  const peers = new Peers();
  let qmp: QmpClient;
  let nbdSock: string;
  afterAll(() => peers.cleanup());

  beforeAll(async () => {
    const dir = await peers.tempDir('ferry-rounds-');
    const image = await peers.image(dir, 'disk.raw', SIZE);
    ({ qmp } = await peers.qemu(dir, ['-blockdev', `driver=file,filename=${image},node-name=disk0-file`, '-blockdev', 'driver=raw,file=disk0-file,node-name=disk0']));
    nbdSock = path.join(dir, 'nbd.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'disk0', name: 'guest', writable: true });
  });

  /** Exports a disabled bitmap read-only, reads its dirty clusters, removes the export. */
  async function readRound(name: string): Promise<Set<number>> {
    const context = `qemu:dirty-bitmap:${name}`;
    await qmp.execute('block-export-add', { type: 'nbd', id: `x-${name}`, 'node-name': 'disk0', name, writable: false, bitmaps: [name] });
    const client = peers.track(await NbdClient.connect({ path: nbdSock }, { exportName: name, metaContexts: [context] }));
    const clusters = new Set<number>();
    for (const e of await client.mapExtents(context)) {
      if (!(e.flags & DIRTY)) continue;
      expect(e.offset % GRANULARITY).toBe(0);
      for (let c = e.offset / GRANULARITY; c < (e.offset + e.length) / GRANULARITY; c++) clusters.add(c);
    }
    await client.close();
    const mark = qmp.eventMark();
    await qmp.execute('block-export-del', { id: `x-${name}` });
    await qmp.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === `x-${name}`, 10_000, mark);
    return clusters;
  }

  it('puts every write in exactly one round, merges a retried round into the next, loses none', async () => {
    const guest = peers.track(await NbdClient.connect({ path: nbdSock }, { exportName: 'guest' }));
    const model = Buffer.alloc(SIZE);
    let tick = 0;
    const rotations: { issued: number; returned: number }[] = []; // rotation j ends round j+1
    const writes: Write[] = [];
    const rand = seeded(20081001);
    const order = [...Array(CLUSTERS).keys()].map((c) => [rand(), c]).sort((a, b) => a[0] - b[0]).map(([, c]) => c);
    let stop = false;
    let acked = 0;

    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'r1', granularity: GRANULARITY });
    // The guest: 4 KiB writes to distinct clusters, 8 in flight, until told to stop.
    const writer = (async () => {
      const inFlight = new Set<Promise<void>>();
      for (const cluster of order) {
        if (stop) break;
        const offset = cluster * GRANULARITY + 4096 * Math.floor(rand() * 16);
        const data = randomBytes(4096);
        data.copy(model, offset);
        const w: Write = { cluster, offset, issued: ++tick, acked: Infinity };
        writes.push(w);
        const p = guest.write(offset, data).then(() => {
          w.acked = ++tick;
          acked++;
          inFlight.delete(p);
        });
        inFlight.add(p);
        if (inFlight.size >= 8) await Promise.race(inFlight);
      }
      await Promise.all(inFlight);
    })();
    const ackedAtLeast = async (n: number) => {
      while (acked < n) await new Promise((r) => setTimeout(r, 2));
    };

    const found = new Map<number, Set<number>>();
    for (let round = 1; round <= ROUNDS; round++) {
      if (round < ROUNDS) await ackedAtLeast(round * WRITES_PER_ROUND);
      else {
        stop = true;
        await writer;
      }
      const issued = ++tick;
      await qmp.execute('transaction', {
        actions: [
          { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: `r${round + 1}`, granularity: GRANULARITY } },
          { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: `r${round}` } },
        ],
      });
      rotations.push({ issued, returned: ++tick });
      // Round `round` is frozen now; it is read while round+1 records the writes that go on.
      found.set(round, await readRound(`r${round}`));
      if (round === RETRIED_ROUND) {
        // The send of this round failed: its set goes back into the recording bitmap.
        await qmp.execute('transaction', {
          actions: [
            { type: 'block-dirty-bitmap-merge', data: { node: 'disk0', target: `r${round + 1}`, bitmaps: [`r${round}`] } },
            { type: 'block-dirty-bitmap-remove', data: { node: 'disk0', name: `r${round}` } },
          ],
        });
      }
    }
    expect(writes.length).toBeGreaterThanOrEqual(ROUNDS * WRITES_PER_ROUND - WRITES_PER_ROUND);

    // Which round a write may be in: after every rotation that returned before it was issued, and
    // not after a rotation issued once it was acknowledged.
    const lo = (w: Write) => 1 + rotations.filter((r) => r.returned < w.issued).length;
    const hi = (w: Write) => 1 + rotations.filter((r) => r.issued < w.acked).length;
    const retried = found.get(RETRIED_ROUND)!;
    const afterRetry = found.get(RETRIED_ROUND + 1)!;
    for (const c of retried) expect(afterRetry.has(c)).toBe(true); // merged, not lost
    const written = new Set(writes.map((w) => w.cluster));
    for (const w of writes) {
      const rounds = [...found].filter(([k, set]) => set.has(w.cluster) && !(k === RETRIED_ROUND + 1 && retried.has(w.cluster))).map(([k]) => k);
      expect({ cluster: w.cluster, rounds }).toEqual({ cluster: w.cluster, rounds: [expect.any(Number)] });
      expect(rounds[0]).toBeGreaterThanOrEqual(lo(w));
      expect(rounds[0]).toBeLessThanOrEqual(hi(w));
    }
    for (const set of found.values()) for (const c of set) expect(written.has(c)).toBe(true); // nothing unwritten is dirty

    // The migration invariant in bytes: the rounds' dirty clusters, copied onto an empty disk, are the disk.
    const reader = peers.track(await NbdClient.connect({ path: nbdSock }, { exportName: 'guest' }));
    const copy = Buffer.alloc(SIZE);
    const ranges = [...new Set([...found.values()].flatMap((s) => [...s]))].sort((a, b) => a - b).map((c) => ({ offset: c * GRANULARITY, length: GRANULARITY }));
    for await (const { offset, data } of reader.readRanges(ranges)) data.copy(copy, offset);
    expect(copy.equals(model)).toBe(true);
    await reader.close();

    const names = (await qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string }[] }[]>('query-named-block-nodes')).find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps']?.map((b) => b.name);
    expect(names).not.toContain(`r${RETRIED_ROUND}`);
    expect(names).toEqual(expect.arrayContaining(['r1', `r${ROUNDS + 1}`]));
    await guest.close();
  });

  it('refuses to export a bitmap that still records, and to merge one that is exported', async () => {
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'live', granularity: GRANULARITY });
    const recording = await rejection(qmp.execute('block-export-add', { type: 'nbd', id: 'x-live', 'node-name': 'disk0', name: 'live', writable: false, bitmaps: ['live'] }));
    expect(recording).toBeInstanceOf(QmpCommandError);
    expect((recording as QmpCommandError).errorClass).toBe('GenericError');
    await qmp.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'live2', granularity: GRANULARITY } },
        { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'live' } },
      ],
    });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'x-live', 'node-name': 'disk0', name: 'live', writable: false, bitmaps: ['live'] });
    const busy = await rejection(qmp.execute('block-dirty-bitmap-merge', { node: 'disk0', target: 'live2', bitmaps: ['live'] }));
    expect(busy).toBeInstanceOf(QmpCommandError);
    expect((busy as QmpCommandError).desc).toMatch(/busy|in use/i);
    const mark = qmp.eventMark();
    await qmp.execute('block-export-del', { id: 'x-live' });
    await qmp.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === 'x-live', 10_000, mark);
    await qmp.execute('block-dirty-bitmap-merge', { node: 'disk0', target: 'live2', bitmaps: ['live'] });
  });

  it('shows a first pass the holes and zeroes it may skip (base:allocation next to a bitmap)', async () => {
    const guest = peers.track(await NbdClient.connect({ path: nbdSock }, { exportName: 'guest' }));
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'sparse', granularity: GRANULARITY });
    await guest.writeZeroes(0, SIZE); // punches the whole image (raw file: holes)
    await guest.write(5 * MiB, randomBytes(MiB));
    await guest.write(33 * MiB + 4096, randomBytes(8192));
    await guest.flush();
    await qmp.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'sparse2', granularity: GRANULARITY } },
        { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'sparse' } },
      ],
    });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'x-sparse', 'node-name': 'disk0', name: 'sparse', writable: false, bitmaps: ['sparse'] });
    const c = peers.track(await NbdClient.connect({ path: nbdSock }, { exportName: 'sparse', metaContexts: [BASE_ALLOCATION, 'qemu:dirty-bitmap:sparse'] }));
    const alloc = await c.mapExtents(BASE_ALLOCATION);
    const data = alloc.filter((e) => !(e.flags & State.ZERO));
    const dataBytes = data.reduce((s, e) => s + e.length, 0);
    expect(dataBytes).toBeGreaterThanOrEqual(MiB + 8192);
    expect(dataBytes).toBeLessThanOrEqual(MiB + 8192 + 2 * GRANULARITY);
    expect(data.some((e) => e.offset <= 5 * MiB && 6 * MiB <= e.offset + e.length)).toBe(true);
    expect(alloc.find((e) => e.offset === 0)).toMatchObject({ flags: State.HOLE | State.ZERO });
    // Every cluster of the image is dirty (the zeroing wrote them all): the bitmap alone would send 64 MiB.
    const dirty = (await c.mapExtents('qemu:dirty-bitmap:sparse')).filter((e) => e.flags & DIRTY);
    expect(dirty.reduce((s, e) => s + e.length, 0)).toBe(SIZE);
    await c.close();
    await qmp.execute('block-export-del', { id: 'x-sparse' });
    await guest.close();
  });
});
