// The hypervisor drivers behind one interface (driver.ts): the simulator (sim/) and QEMU (qemu/).
import type { HypervisorDriver } from './driver';
import { SimDriver, type SimLogger } from './sim/sim-driver';
import { HypervisorError } from './errors';

export type * from './driver';
export { SimDriver } from './sim/sim-driver';
export type { SimDriverOptions, SimCreateOptions, SimStartOptions, SimLogger } from './sim/sim-driver';
export { SimVmHandle } from './sim/vm-handle';
export { HypervisorError, isHypervisorError } from './errors';
export type { HypervisorErrorCode } from './errors';
export { referenceRun, guestLayout, hotBlocks, minMemoryBytes } from './sim/guest';
export { blockContent, GUEST_BLOCK_BYTES } from './sim/content';
export { DirtyBitmap, BlockSet } from './bitmap';

export const DRIVER_KINDS = ['sim', 'qemu'] as const;
export type DriverKind = (typeof DRIVER_KINDS)[number];

/**
 * The driver of an agent. QEMU's needs its binaries and Ferry's guest (`npm run setup:qemu`), and
 * probes once whether KVM really runs a guest here (else TCG).
 */
export async function createDriver(kind: DriverKind, home: string, log?: SimLogger): Promise<HypervisorDriver> {
  switch (kind) {
    case 'sim':
      return new SimDriver({ home, log });
    case 'qemu': {
      const { findQemuAssets } = await import('../scripts/qemu-assets');
      const { probeAccel } = await import('./qemu/accel-probe');
      const { QemuDriver } = await import('./qemu/qemu-driver');
      const assets = await findQemuAssets();
      if ('missing' in assets) throw new HypervisorError('InvalidArgument', `the QEMU driver cannot run here: ${assets.missing}; run npm run setup:qemu (as root it installs QEMU)`);
      const accel = await probeAccel(assets);
      log?.info({ accel: accel.accel, reason: accel.reason, qemu: assets.qemuVersion, kernel: assets.kernelVersion }, `QEMU guests run under ${accel.accel}`);
      return new QemuDriver({ home, qemuSystem: assets.qemuSystem, qemuVersion: assets.qemuVersion, kernel: assets.kernel, initrd: assets.initrd, accel: accel.accel, log });
    }
    default:
      throw new Error(`unknown hypervisor driver ${JSON.stringify(kind)}: use ${DRIVER_KINDS.join(' or ')}`);
  }
}
