import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { vmId, type Workload, WORKLOADS } from '../../common/types';
import type { VmSpec } from '../../hypervisor/driver';
import { blockContent, fillBlockWords, hashString } from '../../hypervisor/sim/content';
import { Guest, fdDisk, fillDisk, referenceRun, sha256, validateSpec } from '../../hypervisor/sim/guest';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-guest-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const spec = (workload: Workload, extra: Partial<VmSpec> = {}): VmSpec => ({
  vmId: vmId('g1'),
  diskBytes: 4 * 1024 * 1024 + 1536, // not a multiple of 4 KiB: the last guest block is 1536 bytes
  memoryBytes: 256 * 1024,
  workload,
  seed: 42,
  opsPerSecond: 0,
  ...extra,
});

describe('block content', () => {
  it('is a pure function of (vm, block, version); version 0 is zeros', () => {
    const a = blockContent('vm-a', 7, 3);
    expect(blockContent('vm-a', 7, 3).equals(a)).toBe(true);
    expect(blockContent('vm-b', 7, 3).equals(a)).toBe(false);
    expect(blockContent('vm-a', 8, 3).equals(a)).toBe(false);
    expect(blockContent('vm-a', 7, 4).equals(a)).toBe(false);
    expect(blockContent('vm-a', 7, 0).equals(Buffer.alloc(4096))).toBe(true);
    expect(blockContent('vm-a', 7, 3, 512).equals(a.subarray(0, 512))).toBe(true);
    // Not degenerate: roughly half the bits set.
    let ones = 0;
    for (const byte of a) for (let b = 0; b < 8; b++) ones += (byte >> b) & 1;
    expect(ones / (4096 * 8)).toBeGreaterThan(0.45);
    expect(ones / (4096 * 8)).toBeLessThan(0.55);
  });

  it('is cheap: tens of thousands of blocks per second even on a busy machine', () => {
    const words = new Uint32Array(1024);
    const h = hashString('speed');
    const t0 = performance.now();
    for (let i = 0; i < 50_000; i++) fillBlockWords(words, h, i, 1 + (i & 7));
    const perSecond = 50_000 / ((performance.now() - t0) / 1000);
    expect(perSecond).toBeGreaterThan(20_000);
  });
});

describe('guest', () => {
  function run(s: VmSpec, image: string, phases: number[]): { disk: string; memory: string; violations: number } {
    fs.writeFileSync(image, '');
    fs.truncateSync(image, s.diskBytes);
    const fd = fs.openSync(image, 'r+');
    try {
      let memory = Buffer.alloc(s.memoryBytes);
      let guest = new Guest(s, memory, fdDisk(fd));
      guest.initMemory();
      for (const upTo of phases) {
        guest.runSync(upTo - guest.ops);
        // "Migrate": a new guest over a copy of the memory, continuing from the saved CPU state.
        const state = guest.saveState();
        memory = Buffer.from(memory);
        guest = new Guest(s, memory, fdDisk(fd));
        guest.loadState(state);
      }
      return { disk: sha256(fs.readFileSync(image)), memory: sha256(memory), violations: guest.violations };
    } finally {
      fs.closeSync(fd);
    }
  }

  it.each(WORKLOADS)('%s: N ops give the same disk and memory with or without save/load in between', async (w) => {
    const s = spec(w);
    const ops = w === 'seqwrite' ? 300 : 5000;
    const straight = run(s, path.join(dir, `${w}-a.img`), [ops]);
    const split = run(s, path.join(dir, `${w}-b.img`), [Math.floor(ops / 3), Math.floor(ops / 2), ops]);
    expect(split).toEqual(straight);
    expect(straight.violations).toBe(0);
    const ref = await referenceRun(s, ops, dir);
    expect(ref).toEqual({ disk: straight.disk, memory: straight.memory });
    if (w === 'idle') expect(ref.disk).toBe(sha256(Buffer.alloc(s.diskBytes)));
  });

  it('idle dirties one page of memory however many operations it runs; memhog dirties them all', () => {
    const pagesDirtied = (w: Workload, ops: number): number => {
      const s = spec(w);
      const image = path.join(dir, `dirty-${w}.img`);
      fs.writeFileSync(image, '');
      fs.truncateSync(image, s.diskBytes);
      const fd = fs.openSync(image, 'r+');
      try {
        const pages = new Set<number>();
        const guest = new Guest(s, Buffer.alloc(s.memoryBytes), fdDisk(fd), {
          onMemoryWrite: (offset, length) => {
            for (let p = Math.floor(offset / 4096); p <= Math.floor((offset + length - 1) / 4096); p++) pages.add(p);
          },
        });
        guest.initMemory();
        guest.runSync(ops);
        return pages.size;
      } finally {
        fs.closeSync(fd);
      }
    };
    expect(pagesDirtied('idle', 100_000)).toBe(1);
    expect(pagesDirtied('memhog', 100_000)).toBeGreaterThan(0.9 * (spec('memhog').memoryBytes / 4096 - 2));
  });

  it('fill writes version 1 everywhere; the read check passes on it and fails if the table disagrees', async () => {
    const s = spec('readmostly', { fill: true });
    const image = path.join(dir, 'fill.img');
    const file = await fs.promises.open(image, 'w+');
    try {
      await file.truncate(s.diskBytes);
      await fillDisk(file, s);
      const good = new Guest(s, Buffer.alloc(s.memoryBytes), fdDisk(file.fd));
      good.initMemory();
      good.runSync(2000);
      expect(good.violations).toBe(0);
      // A guest whose table says "never written" (version 0) reads data it does not expect.
      const wrong = new Guest({ ...s, fill: false }, Buffer.alloc(s.memoryBytes), fdDisk(file.fd));
      wrong.initMemory();
      wrong.runSync(200);
      expect(wrong.violations).toBeGreaterThan(0);
    } finally {
      await file.close();
    }
    const filled = await referenceRun(s, 2000, dir);
    expect(filled.disk).not.toBe((await referenceRun({ ...s, fill: false }, 2000, dir)).disk);
  });

  it('different seeds give different runs', async () => {
    const a = await referenceRun(spec('randwrite'), 1000, dir);
    const b = await referenceRun(spec('randwrite', { seed: 43 }), 1000, dir);
    expect(a.disk).not.toBe(b.disk);
  });

  it('validates the spec with messages that name the fix', () => {
    expect(() => validateSpec(spec('idle', { diskBytes: 1000 }))).toThrow(/512-byte sectors/);
    expect(() => validateSpec(spec('idle', { memoryBytes: 4096 }))).toThrow(/at least/);
    expect(() => validateSpec(spec('nope' as Workload))).toThrow(/one of idle/);
    expect(() => validateSpec(spec('idle', { opsPerSecond: -1 }))).toThrow(/>= 0/);
    expect(() => validateSpec(spec('idle', { vmId: 'Bad Id' as never }))).toThrow(/a-z/);
  });

  it('refuses a CPU state of another VM', () => {
    const s = spec('randwrite');
    const g = new Guest(s, Buffer.alloc(s.memoryBytes), { read: () => undefined, write: () => undefined });
    const other = new Guest({ ...s, seed: 1 }, Buffer.alloc(s.memoryBytes), { read: () => undefined, write: () => undefined });
    expect(() => g.loadState(other.saveState())).toThrow(/seed/);
    expect(() => g.loadState(Buffer.from('garbage'))).toThrow(/saveState/);
  });
});
