import { DISK_FILE_NODE, DISK_NBD_NODE, DISK_NODE, QEMU_MACHINE, qemuArgs, type QemuVmConfig } from '../../hypervisor/qemu/command-line';
import { guestKernelCmdline } from '../../hypervisor/qemu/guest-params';

const config: QemuVmConfig = {
  vmId: 'vm1',
  memoryBytes: 128 * 1024 * 1024,
  vcpus: 1,
  accel: 'tcg',
  kernel: '/k/vmlinuz',
  initrd: '/k/initrd.gz',
  append: 'console=ttyS0',
  qmpSocket: '/run/a,b/qmp.sock',
  consoleLog: '/run/vm1/console.log',
  probeSocket: '/run/vm1/probe.sock',
  pidFile: '/run/vm1/qemu.pid',
  disk: { kind: 'file', path: '/img/vm1.img' },
};

/** The value following each occurrence of `flag`. */
const values = (args: string[], flag: string): string[] => args.flatMap((a, i) => (a === flag ? [args[i + 1]] : []));

it('builds the devices, node names and sockets the driver expects', () => {
  const args = qemuArgs(config);
  expect(values(args, '-machine')).toEqual([QEMU_MACHINE]);
  // Under TCG two pages more than asked: QEMU 7.2's fast dirty-bitmap sync loses TCG stores (command-line.ts).
  expect(values(args, '-m')).toEqual([`${128 * 1024 + 8}K`]);
  expect(values(qemuArgs({ ...config, accel: 'kvm' }), '-m')).toEqual([`${128 * 1024}K`]);
  expect(args).toEqual(expect.arrayContaining(['-nodefaults', '-nographic', '-no-reboot']));
  expect(values(args, '-nic')).toEqual(['none']);
  expect(values(args, '-blockdev')).toEqual([`driver=file,filename=/img/vm1.img,node-name=${DISK_FILE_NODE}`, `driver=raw,file=${DISK_FILE_NODE},node-name=${DISK_NODE}`]);
  expect(values(args, '-device')).toEqual([
    'isa-serial,index=0,chardev=console0,id=serial0',
    'isa-serial,index=1,chardev=probe0,id=serial1',
    `virtio-blk-pci,drive=${DISK_NODE},id=vblk0`,
  ]);
  // A comma in a path is doubled (QEMU's option syntax).
  expect(values(args, '-chardev')[0]).toBe('socket,id=qmp0,path=/run/a,,b/qmp.sock,server=on,wait=off');
  expect(args).not.toContain('-incoming');
  expect(args).not.toContain('-S');
});

it('a destination: NBD-backed disk, -incoming defer, paused', () => {
  const args = qemuArgs({ ...config, disk: { kind: 'nbd', socket: '/run/nbd.sock', export: 'disk0' }, incoming: true, paused: true });
  expect(values(args, '-blockdev')).toEqual([
    `driver=nbd,server.type=unix,server.path=/run/nbd.sock,export=disk0,node-name=${DISK_NBD_NODE}`,
    `driver=raw,file=${DISK_NBD_NODE},node-name=${DISK_NODE}`,
  ]);
  expect(values(args, '-incoming')).toEqual(['defer']);
  expect(args).toContain('-S');
  // Everything but the disk backend and the incoming flags is the same as the source's.
  const strip = (a: string[]): string[] => a.filter((x) => !x.startsWith('driver=') && !['-incoming', 'defer', '-S'].includes(x));
  expect(strip(args)).toEqual(strip(qemuArgs(config)));
});

it('refuses memory that is not whole MiB', () => {
  expect(() => qemuArgs({ ...config, memoryBytes: 1000 })).toThrow(/multiple of 1048576/);
});

it('writes the guest parameters onto the kernel command line', () => {
  expect(guestKernelCmdline({ seed: 5, workload: 'mixed', rate: 0, fill: true, rescan: false })).toBe(
    'console=ttyS0 panic=-1 quiet ferry.seed=5 ferry.workload=mixed ferry.rate=0 ferry.fill=1 ferry.rescan=0',
  );
  expect(() => guestKernelCmdline({ seed: 1.5, workload: 'idle' })).toThrow(/seed 1.5/);
  expect(() => guestKernelCmdline({ seed: 1, workload: 'dance' as never })).toThrow(/workload "dance"/);
});
