// Atomic writes leave no temp file behind when they fail, and the sweep removes only stale ones.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { isTempFile, sweepTempFiles, tempFileFor, writeFileDurable } from '../../common/durable-file';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-durable-'));
});
afterEach(() => fs.rm(dir, { recursive: true, force: true }));

it('a write that fails after its temp file was created removes it', async () => {
  const file = path.join(dir, 'vm5.json');
  await expect(writeFileDurable(file, 42 as unknown as string)).rejects.toThrow();
  expect(await fs.readdir(dir)).toEqual([]);
  await writeFileDurable(file, '{}');
  expect(await fs.readdir(dir)).toEqual(['vm5.json']);
});

it('the sweep removes temp files older than the bound, at any depth, and nothing else', async () => {
  await fs.mkdir(path.join(dir, 'ownership'));
  const old = tempFileFor(path.join(dir, 'ownership', 'vm5.json'));
  const fresh = tempFileFor(path.join(dir, 'vm6.json'));
  for (const f of [old, fresh, path.join(dir, 'keep.json'), path.join(dir, '.hidden')]) await fs.writeFile(f, '');
  const hourAgo = new Date(Date.now() - 3_600_000);
  await fs.utimes(old, hourAgo, hourAgo);
  expect(isTempFile(path.basename(old))).toBe(true);
  expect(await sweepTempFiles(dir, 30_000)).toEqual([old]);
  expect((await fs.readdir(dir)).sort()).toEqual(['.hidden', path.basename(fresh), 'keep.json', 'ownership'].sort());
});
