// The harness's pause points: inert unless armed, and an armed one holds until released.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { faultPoint } from '../../common/fault-points';

let dir: string;
const saved = process.env.FERRY_FAULT_POINTS_DIR;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-fp-'));
});

afterEach(async () => {
  if (saved === undefined) delete process.env.FERRY_FAULT_POINTS_DIR;
  else process.env.FERRY_FAULT_POINTS_DIR = saved;
  await fs.rm(dir, { recursive: true, force: true });
});

it('does nothing without FERRY_FAULT_POINTS_DIR, even if a point is armed', async () => {
  delete process.env.FERRY_FAULT_POINTS_DIR;
  await fs.writeFile(path.join(dir, 'switchover-after-pause.arm'), '');
  await faultPoint('switchover-after-pause');
  expect(await fs.readdir(dir)).toEqual(['switchover-after-pause.arm']);
});

it('passes an unarmed point at once', async () => {
  process.env.FERRY_FAULT_POINTS_DIR = dir;
  await faultPoint('switchover-before-pause');
  expect(await fs.readdir(dir)).toEqual([]);
});

it('an armed point says it was reached and holds until released', async () => {
  process.env.FERRY_FAULT_POINTS_DIR = dir;
  await fs.writeFile(path.join(dir, 'switchover-after-commit.arm'), '');
  let passed = false;
  const held = faultPoint('switchover-after-commit').then(() => (passed = true));
  while (!(await fs.access(path.join(dir, 'switchover-after-commit.reached')).then(() => true, () => false))) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 200));
  expect(passed).toBe(false);
  await fs.writeFile(path.join(dir, 'switchover-after-commit.release'), '');
  await held;
  expect(passed).toBe(true);
});
