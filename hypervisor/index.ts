// The hypervisor drivers behind one interface (driver.ts). Today: the simulated hypervisor.
import type { HypervisorDriver } from './driver';
import { SimDriver, type SimLogger } from './sim/sim-driver';

export type * from './driver';
export { SimDriver } from './sim/sim-driver';
export type { SimDriverOptions, SimCreateOptions, SimStartOptions, SimLogger } from './sim/sim-driver';
export { SimVmHandle } from './sim/vm-handle';
export { HypervisorError, isHypervisorError } from './errors';
export type { HypervisorErrorCode } from './errors';
export { referenceRun, guestLayout, hotBlocks, minMemoryBytes } from './sim/guest';
export { blockContent, GUEST_BLOCK_BYTES } from './sim/content';
export { DirtyBitmap, BlockSet } from './bitmap';

export type DriverKind = 'sim';

export function createDriver(kind: DriverKind, home: string, log?: SimLogger): HypervisorDriver {
  switch (kind) {
    case 'sim':
      return new SimDriver({ home, log });
    default:
      throw new Error(`unknown hypervisor driver ${JSON.stringify(kind)}: use 'sim'`);
  }
}
