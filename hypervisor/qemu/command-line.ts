// The qemu-system-x86_64 argv of a Ferry VM. Source and destination of a migration get the same
// machine type and devices from the same config (only `incoming`, `paused` and the disk's backend
// differ), and the node names are those the driver's QMP sequences use (shared/DESIGN.md): file
// node `disk0-file` or NBD node `disk0-nbd`, raw node `disk0` (bitmaps live there), device `vblk0`.
export type QemuAccel = 'kvm' | 'tcg';

/** Pinned, not the `pc` alias: both ends of a migration must agree whatever their QEMU's newest type. */
export const QEMU_MACHINE = 'pc-i440fx-7.2';
export const DISK_NODE = 'disk0';
export const DISK_FILE_NODE = 'disk0-file';
export const DISK_NBD_NODE = 'disk0-nbd';
export const DISK_DEVICE = 'vblk0';

export type QemuDiskBackend = { kind: 'file'; path: string } | { kind: 'nbd'; socket: string; export: string };

export interface QemuVmConfig {
  vmId: string;
  memoryBytes: number;
  vcpus: number;
  accel: QemuAccel;
  kernel: string;
  initrd: string;
  /** The kernel command line (guestKernelCmdline). */
  append: string;
  qmpSocket: string;
  /** The guest's console (ttyS0) goes to this file. */
  consoleLog: string;
  /** The guest program's channel (ttyS1), a unix socket QEMU listens on (GuestProbe connects). */
  probeSocket: string;
  pidFile: string;
  disk: QemuDiskBackend;
  /** Destination of a migration: -incoming defer (then migrate-incoming over QMP). */
  incoming?: boolean;
  /** -S: the CPUs wait for `cont`. */
  paused?: boolean;
}

const MIB = 1024 * 1024;

/**
 * QEMU 7.2's TCG loses guest stores during migration when the RAM block is a multiple of 64 pages:
 * the fast path of cpu_physical_memory_sync_dirty_bitmap clears dirty bits without resetting the TCG
 * TLB, so stores through a still-writable TLB entry set no dirty bit and are never sent again (fixed
 * upstream in QEMU 9.0, "physmem: Fix migration dirty bitmap coherency with TCG memory access").
 * Two pages more than asked take the per-page path, which resets the TLB. KVM tracks dirty pages
 * itself and gets the size asked.
 */
export const TCG_RAM_PAD_BYTES = 8192;

function ramSize(c: QemuVmConfig): string {
  const bytes = c.memoryBytes + (c.accel === 'tcg' ? TCG_RAM_PAD_BYTES : 0);
  return `${bytes / 1024}K`;
}

/** QEMU's option syntax: a comma inside a value is written twice. */
const opt = (value: string): string => value.replace(/,/g, ',,');

export function qemuArgs(c: QemuVmConfig): string[] {
  if (!Number.isInteger(c.memoryBytes) || c.memoryBytes <= 0 || c.memoryBytes % MIB !== 0) {
    throw new RangeError(`memoryBytes ${c.memoryBytes}: QEMU takes whole MiB, use a multiple of ${MIB}`);
  }
  if (!Number.isInteger(c.vcpus) || c.vcpus < 1) throw new RangeError(`vcpus ${c.vcpus}: use a whole number >= 1`);
  const args = [
    '-name', c.vmId,
    '-machine', QEMU_MACHINE,
    '-accel', c.accel,
    '-m', ramSize(c),
    '-smp', String(c.vcpus),
    '-nodefaults', '-no-user-config', '-nographic', '-nic', 'none', '-no-reboot',
    '-kernel', c.kernel,
    '-initrd', c.initrd,
    '-append', c.append,
    '-chardev', `socket,id=qmp0,path=${opt(c.qmpSocket)},server=on,wait=off`,
    '-mon', 'chardev=qmp0,mode=control',
    '-chardev', `file,id=console0,path=${opt(c.consoleLog)}`,
    '-device', 'isa-serial,index=0,chardev=console0,id=serial0',
    '-chardev', `socket,id=probe0,path=${opt(c.probeSocket)},server=on,wait=off`,
    '-device', 'isa-serial,index=1,chardev=probe0,id=serial1',
    '-pidfile', c.pidFile,
    ...diskArgs(c.disk),
  ];
  if (c.incoming) args.push('-incoming', 'defer');
  if (c.paused) args.push('-S');
  return args;
}

function diskArgs(disk: QemuDiskBackend): string[] {
  const child =
    disk.kind === 'file'
      ? { node: DISK_FILE_NODE, spec: `driver=file,filename=${opt(disk.path)},node-name=${DISK_FILE_NODE}` }
      : { node: DISK_NBD_NODE, spec: `driver=nbd,server.type=unix,server.path=${opt(disk.socket)},export=${opt(disk.export)},node-name=${DISK_NBD_NODE}` };
  return [
    '-blockdev', child.spec,
    '-blockdev', `driver=raw,file=${child.node},node-name=${DISK_NODE}`,
    '-device', `virtio-blk-pci,drive=${DISK_NODE},id=${DISK_DEVICE}`,
  ];
}
