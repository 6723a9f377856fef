// The TypeScript content function against the C guest's own (`ferry-guest --dump`), byte for byte.
import { execFileSync, spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { blockContent, BLOCK_MAGIC, fillImage, GUEST_BLOCK_BYTES, readBlockHeader, seedKey } from '../../hypervisor/qemu/guest-content';
import { ensureGuestProgram } from '../../scripts/qemu-assets';

const hasGcc = spawnSync('gcc', ['--version'], { stdio: 'ignore' }).status === 0;
const inCi = Boolean(process.env.CI) && process.env.CI !== 'false';
if (!hasGcc && !inCi) process.stderr.write('\n*** SKIPPED: the C guest cannot be built: no gcc (install gcc and libc6-dev) ***\n\n');

(hasGcc || inCi ? describe : describe.skip)('the C guest and the TypeScript content function', () => {
  let program: string;
  beforeAll(async () => {
    if (!hasGcc) throw new Error('the C guest must be checked in CI, but there is no gcc: install gcc and libc6-dev');
    program = await ensureGuestProgram(() => undefined);
  }, 120_000);

  const cases: [number, number, number][] = [
    [0, 0, 1],
    [4242, 1000, 7],
    [1, 2, 3],
    [2 ** 53 - 1, 2 ** 32 + 5, 0xffff_ffff],
    [2 ** 40 + 3, 123_456_789, 2 ** 31],
    [7, 0, 0],
  ];
  it.each(cases)('seed %d, block %d, version %d: identical bytes', (seed, block, version) => {
    const c = execFileSync(program, ['--dump', String(seed), String(block), String(version)]);
    expect(c.length).toBe(GUEST_BLOCK_BYTES);
    expect(Buffer.compare(c, blockContent(seed, block, version))).toBe(0);
  });
});

it('version 0 is all zeros; others carry a header naming them', () => {
  expect(blockContent(9, 5, 0).equals(Buffer.alloc(GUEST_BLOCK_BYTES))).toBe(true);
  expect(readBlockHeader(blockContent(9, 2 ** 32 + 5, 3))).toEqual({ magic: BLOCK_MAGIC, version: 3, block: 2 ** 32 + 5, seedKey: seedKey(9) });
  expect(blockContent(9, 5, 3).equals(blockContent(9, 5, 4))).toBe(false);
  expect(blockContent(9, 5, 3).equals(blockContent(10, 5, 3))).toBe(false);
  expect(() => blockContent(-1, 0, 1)).toThrow(/seed -1/);
  expect(() => blockContent(0, 0, 2 ** 32)).toThrow(/version/);
});

it('fillImage writes version 1 of every block', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-fill-'));
  try {
    const file = path.join(dir, 'disk.img');
    const blocks = 1024 + 3; // more than one write chunk
    await fillImage(file, 77, blocks * GUEST_BLOCK_BYTES);
    const data = await fs.readFile(file);
    expect(data.length).toBe(blocks * GUEST_BLOCK_BYTES);
    for (const b of [0, 1, 1023, 1024, blocks - 1]) {
      expect(data.subarray(b * GUEST_BLOCK_BYTES, (b + 1) * GUEST_BLOCK_BYTES).equals(blockContent(77, b, 1))).toBe(true);
    }
    await expect(fillImage(file, 77, 1000)).rejects.toThrow(/multiple of 4096/);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
