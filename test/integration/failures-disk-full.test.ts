// A destination whose filesystem fills up (its home is a real 100 MiB tmpfs): the migration rolls
// back at once with ENOSPC and the host named, the fence is written although the disk is full, and
// nothing is left there (no shell, no VM files, no temp files of atomic writes). A VM that does not
// fit is refused at creation without leaving half of itself behind.
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { execFileSync, spawnSync } from 'node:child_process';
import { useCluster, testVm, expectGuestCorrect, waitForProgress, uniqueHosts } from '../support/cluster';
import { ferry as runFerry } from '../support/cli';
import { agentLog, migrationIdOf, ownershipOn, shells, tempFiles, within } from '../support/host-checks';
import type { MigrationState } from '../../client/ferry-client';

const [a, b] = uniqueHosts('a', 'b');
const MiB = 1024 * 1024;
jest.setTimeout(300_000);

let root = '';
let mountPoint = '';
const t = useCluster([a, b], { FERRY_RECONCILE_SECONDS: '2' }, async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-full-'));
  mountPoint = path.join(root, b);
  await fs.mkdir(mountPoint);
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=100m', 'tmpfs', mountPoint], { stdio: 'pipe' });
  } catch (err) {
    throw new Error(`this test mounts a 100 MiB tmpfs as a destination's home and needs root for it: ${(err as Error).message}`);
  }
  return { root };
});

afterAll(async () => {
  // Lazily: the cluster's own afterAll stops the processes that use it.
  if (mountPoint) spawnSync('umount', ['-l', mountPoint]);
  if (root) await fs.rm(root, { recursive: true, force: true });
});

const filler = () => path.join(t.cluster.home(b), 'filler');

it('a VM that does not fit is refused with the cause, and no half of it stays behind', async () => {
  const vm = testVm('idle');
  const run = await runFerry(['vm', 'create', vm.vmId, '--host', b, '--disk', '128MiB', '--memory', '8MiB', '--workload', 'idle', '--fill']);
  expect({ code: run.code, stderr: run.stderr.trim() }).toEqual({ code: 1, stderr: expect.stringMatching(new RegExp(`^ferry: host ${b}: no space left on the filesystem \\(ENOSPC.*\\): free space there$`)) });
  expect(await fs.readdir(path.join(t.cluster.home(b), 'vms')).catch(() => [])).toEqual([]);
  expect(await tempFiles(t.cluster, b)).toEqual([]);
  // The id is free again: a VM that fits is created under it.
  await t.ferry.hostCommand(b, 'vmCreate', { ...vm, diskBytes: 8 * MiB });
  await t.ferry.hostCommand(b, 'vmDestroy', { vmId: vm.vmId });
});

it('the destination filesystem fills during the disk precopy: rolled back at once with ENOSPC named, the fence written, nothing left', async () => {
  const vm = testVm('randwrite', { opsPerSecond: 20, diskBytes: 64 * MiB, memoryBytes: 8 * MiB });
  await t.ferry.hostCommand(a, 'vmCreate', vm);
  const handle = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 5 * MiB });
  await waitForProgress(handle, 'the disk precopy under way', (p) => p.phase === 'disk-precopy' && p.disk.sentBytes > 8 * MiB);
  spawnSync('dd', ['if=/dev/zero', `of=${filler()}`, 'bs=1M'], { stdio: 'ignore' }); // until ENOSPC

  const report = await within('the migration to end', 60_000, handle.result());
  const cause = new RegExp(`host ${b}: no space left on the filesystem \\(.*ENOSPC.*\\): free space there, or migrate to another destination`);
  expect(report).toMatchObject({ outcome: 'rolled-back', failedDestinations: [{ host: b, reason: expect.stringMatching(cause) }] });
  const status = JSON.parse((await runFerry(['status', vm.vmId, '--json'])).stdout) as MigrationState;
  expect(status.report?.reason).toMatch(cause);
  const id = await migrationIdOf(handle);
  expect((await agentLog(t.cluster, a, id)).some((l) => cause.test(l.msg))).toBe(true);
  expect((await agentLog(t.cluster, b, id)).some((l) => l.msg === 'could not apply a data-plane message' && l.code === 'ENOSPC')).toBe(true);

  expect(await shells(t.cluster, b, vm.vmId)).toEqual([]);
  expect((await t.cluster.vmProcesses(b)).map((p) => p.vmId)).not.toContain(vm.vmId);
  expect(await fs.readdir(path.join(t.cluster.home(b), 'vms')).catch(() => [])).toEqual([]);
  expect(await tempFiles(t.cluster, b)).toEqual([]);
  expect(await ownershipOn(t.cluster, b, vm.vmId)).toMatchObject({ state: 'aborted', epoch: 2 });
  expect(await t.ferry.hostCommand(a, 'vmInspect', { vmId: vm.vmId })).toMatchObject({ state: 'running', ownership: { state: 'running', epoch: 1 } });

  // With the space back, the same destination takes the VM.
  await fs.rm(filler());
  const again = await t.ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b] });
  expect(await again.result()).toMatchObject({ outcome: 'completed', destinationHost: b });
  await expectGuestCorrect(t.ferry, b, vm);
});
