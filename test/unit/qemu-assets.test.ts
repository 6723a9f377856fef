// Provisioning pieces on synthetic inputs: QEMU's version check, a kernel's version from its
// bzImage header, the module load order, and what find says when nothing is there.
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { findQemuAssets } from '../../scripts/qemu-assets';
import { findQemuBinaries } from '../../scripts/qemu/binaries';
import { readKernelVersion } from '../../scripts/qemu/kernel';
import { modulesToLoad } from '../../scripts/qemu/kernel-modules';

let dir: string;
const saved = { ...process.env };
beforeEach(async () => (dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-qemu-assets-'))));
afterEach(async () => {
  process.env = { ...saved };
  await fs.rm(dir, { recursive: true, force: true });
});

async function fakeQemu(version: string): Promise<string> {
  const bin = path.join(dir, 'bin');
  await fs.mkdir(bin, { recursive: true });
  await fs.writeFile(path.join(bin, 'qemu-system-x86_64'), `#!/bin/sh\necho "QEMU emulator version ${version} (test)"\n`, { mode: 0o755 });
  await fs.writeFile(path.join(bin, 'qemu-img'), `#!/bin/sh\necho "qemu-img version ${version} (test)"\n`, { mode: 0o755 });
  return bin;
}

it('takes QEMU from FERRY_QEMU when it is 7.2 or later, and says why not otherwise', async () => {
  process.env.FERRY_QEMU = await fakeQemu('8.0.4');
  expect(await findQemuBinaries()).toMatchObject({ qemuVersion: '8.0.4', qemuRoute: 'env', qemuImg: path.join(dir, 'bin', 'qemu-img') });
  process.env.FERRY_QEMU = await fakeQemu('7.1.0');
  expect(await findQemuBinaries()).toEqual({ missing: expect.stringMatching(/version 7\.1\.0, Ferry needs QEMU 7\.2 or later/) });
  process.env.FERRY_QEMU = path.join(dir, 'nowhere');
  expect(await findQemuBinaries()).toEqual({ missing: expect.stringMatching(/FERRY_QEMU=.*nowhere has no executable qemu-system-x86_64/) });
});

it('reads the kernel version from a bzImage setup header', async () => {
  const image = Buffer.alloc(0x1000);
  image.write('HdrS', 0x202, 'latin1');
  image.writeUInt16LE(0x300, 0x20e);
  image.write('6.1.0-99-cloud-amd64 (builder@example) #1 SMP\0', 0x500, 'latin1');
  const file = path.join(dir, 'vmlinuz');
  await fs.writeFile(file, image);
  expect(await readKernelVersion(file)).toBe('6.1.0-99-cloud-amd64');
  await fs.writeFile(file, Buffer.alloc(0x1000));
  await expect(readKernelVersion(file)).rejects.toThrow(/not a bzImage/);
});

it('loads modules dependencies first, skipping built-in ones', async () => {
  const mods = path.join(dir, 'modules');
  const ko = async (rel: string, depends: string): Promise<void> => {
    await fs.mkdir(path.dirname(path.join(mods, 'kernel', rel)), { recursive: true });
    await fs.writeFile(path.join(mods, 'kernel', rel), Buffer.from(`\x7fELF junk\0license=GPL\0depends=${depends}\0name=x\0`, 'latin1'));
  };
  await ko('drivers/virtio/virtio_ring.ko', '');
  await ko('drivers/virtio/virtio.ko', 'virtio_ring');
  await ko('drivers/virtio/virtio_pci.ko', 'virtio_ring,virtio,virtio_pci_modern_dev');
  await ko('drivers/block/virtio_blk.ko', 'virtio,virtio_ring');
  await fs.writeFile(path.join(mods, 'modules.builtin'), 'kernel/drivers/virtio/virtio_pci_modern_dev.ko\n');
  expect((await modulesToLoad(mods)).map((m) => m.name)).toEqual(['virtio_ring', 'virtio', 'virtio_pci', 'virtio_blk']);
  await fs.rm(path.join(mods, 'kernel', 'drivers/virtio/virtio_ring.ko'));
  await expect(modulesToLoad(mods)).rejects.toThrow(/virtio_ring \(needed by virtio_pci\) is neither built in nor in/);
});

it('find installs nothing and names the fix when there is no guest kernel', async () => {
  process.env.FERRY_QEMU = await fakeQemu('7.2.0');
  process.env.FERRY_CACHE_DIR = path.join(dir, 'cache');
  delete process.env.FERRY_GUEST_KERNEL;
  expect(await findQemuAssets()).toEqual({ missing: expect.stringMatching(/no guest kernel in .*cache.qemu: run npm run setup:qemu/) });
  process.env.FERRY_GUEST_KERNEL = path.join(dir, 'nope');
  expect(await findQemuAssets()).toEqual({ missing: expect.stringMatching(/FERRY_GUEST_KERNEL=.*nope: .*Point it at an x86 bzImage/) });
});
