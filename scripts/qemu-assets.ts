/**
 * What Ferry needs to boot a real guest under QEMU: qemu-system-x86_64 and qemu-img (>= 7.2), a
 * Linux kernel and the initramfs with Ferry's guest program (guest/). `npm run setup:qemu`
 * provisions them (scripts/setup-qemu.ts); the cache is `<ferry cache>/qemu` (the Temporal CLI's
 * root: $FERRY_CACHE_DIR, else ~/.cache/ferry).
 *
 * Overrides: FERRY_QEMU (a directory holding both QEMU binaries), FERRY_GUEST_KERNEL and
 * FERRY_GUEST_INITRD (files of your own; an initrd must hold a compatible guest program).
 */
import * as path from 'node:path';
import { promises as fsp } from 'node:fs';
import type { LogFn } from './provisioning';
import { Apt } from './qemu/apt';
import { ensureQemuBinaries, findQemuBinaries, type Missing, type QemuBinaries, type QemuRoute } from './qemu/binaries';
import { BUILD_PACKAGES, ensureInitramfs, missingBuildTools } from './qemu/guest-build';
import { ensureGuestKernel, findGuestKernel, type GuestKernel } from './qemu/kernel';

export type { Missing, QemuRoute };
export { qemuCacheDir } from './qemu/kernel';
export { ensureGuestProgram, guestVersion } from './qemu/guest-build';

const INITRD_ENV = 'FERRY_GUEST_INITRD';

export interface QemuAssets {
  qemuSystem: string;
  qemuImg: string;
  qemuVersion: string;
  /** Where QEMU came from: FERRY_QEMU, PATH, or installed now with apt-get. */
  qemuRoute: QemuRoute;
  kernel: string;
  kernelVersion: string;
  initrd: string;
  /** The hash of guest/'s sources the initramfs was built from ('external' for FERRY_GUEST_INITRD). */
  guestVersion: string;
}

/**
 * The assets as they are, installing and downloading nothing. A missing initramfs is built (a few
 * seconds, from local files only) when the kernel and the build tools are there, so an edit to the
 * guest's sources takes effect on the next run.
 */
export async function findQemuAssets(opts: { log?: LogFn } = {}): Promise<QemuAssets | Missing> {
  const log = opts.log ?? (() => undefined);
  const qemu = await findQemuBinaries();
  if ('missing' in qemu) return qemu;
  const kernel = await findGuestKernel();
  if ('missing' in kernel) return kernel;
  return withInitrd(qemu, kernel, log);
}

/** Provisions what is missing, saying what it does: QEMU (as root with apt-get), the kernel, the initramfs. */
export async function ensureQemuAssets(opts: { log: LogFn }): Promise<QemuAssets | Missing> {
  const { log } = opts;
  const apt = new Apt(log);
  const qemu = await ensureQemuBinaries(apt);
  if ('missing' in qemu) return qemu;
  log(`QEMU ${qemu.qemuVersion}: route ${qemu.qemuRoute} (${qemu.qemuSystem}, ${qemu.qemuImg})`);
  const kernel = await ensureGuestKernel(apt, log);
  if ('missing' in kernel) return kernel;
  log(`guest kernel ${kernel.kernelVersion}: ${kernel.kernel}`);
  if (!process.env[INITRD_ENV]) {
    const lacks = await missingBuildTools();
    if (lacks.length && Apt.canInstall()) {
      log(`the guest build needs ${lacks.join(' and ')}: installing ${BUILD_PACKAGES.join(' ')}`);
      await apt.install(BUILD_PACKAGES).catch((err: unknown) => log(err instanceof Error ? err.message : String(err)));
    }
  }
  return withInitrd(qemu, kernel, log);
}

async function withInitrd(qemu: QemuBinaries, kernel: GuestKernel, log: LogFn): Promise<QemuAssets | Missing> {
  const base = { ...qemu, kernel: kernel.kernel, kernelVersion: kernel.kernelVersion };
  const explicit = process.env[INITRD_ENV];
  if (explicit) {
    const initrd = path.resolve(explicit);
    if (!(await fsp.stat(initrd).catch(() => null))?.isFile()) return { missing: `${INITRD_ENV}=${explicit}: no such file. Point it at an initramfs, or unset it to let Ferry build one` };
    return { ...base, initrd, guestVersion: 'external' };
  }
  const lacks = await missingBuildTools();
  if (lacks.length) {
    return { missing: `building the guest needs ${lacks.join(' and ')}: install Debian's ${BUILD_PACKAGES.join(' ')} (npm run setup:qemu does as root), or set ${INITRD_ENV}` };
  }
  const built = await ensureInitramfs(kernel, log);
  if ('missing' in built) return built;
  return { ...base, ...built };
}
