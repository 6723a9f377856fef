// The postcopy disk server of one QEMU VM: `node stale-disk-main <vmDir>`, started detached by the
// QEMU driver when a migration commits with stale blocks, so that it outlives the destination agent
// as QEMU does. It serves the destination QEMU's disk over NBD (<vmDir>/stale/nbd.sock, export
// `disk0`) from the local image and the stale map (stale-disk.ts), and takes the agent's deliveries
// over the control protocol (hypervisor/control; <vmDir>/stale/control.sock). It is started when the
// incoming stream begins, so that the freeze does not wait for a process to start, and serves once
// it has the stale set:
//   set-stale {blockBytes} + attachment (one bit per block) → starts the NBD server
//   query-stale → {count, blocks, waiting, waits, longestWaitMs, totalWaitMs}
//   deliver-blocks {blockBytes, items: [{block, length}]} + attachment → {applied, discarded, staleBlocks}
//   quit → flushes the image and exits
// and the event BLOCK_NEEDED {block} for every block a guest I/O waits for.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ControlServer } from '../control/server';
import { HypervisorError } from '../errors';
import type { JsonObject } from '../control/protocol';
import { FileDiskAccess } from '../file-disk';
import { NbdServer } from '../../nbd/server';
import { StaleDisk } from './stale-disk';
import { QemuVmPaths } from './vm-files';

async function main(): Promise<void> {
  const dir = process.argv[2];
  if (!dir) {
    process.stderr.write('usage: stale-disk-main <vmDir>\n');
    process.exit(2);
  }
  const paths = new QemuVmPaths(path.resolve(dir));
  const vmId = path.basename(paths.dir);
  const log = (msg: string, extra: JsonObject = {}): void => {
    fs.writeSync(1, `${JSON.stringify({ time: new Date().toISOString(), pid: process.pid, vmId, msg, ...extra })}\n`);
  };
  const image = await FileDiskAccess.open(paths.disk);
  let control: ControlServer | null = null;
  let disk: StaleDisk | null = null;
  let nbd: NbdServer | null = null;
  const serve = async (blockBytes: number, bits: Buffer): Promise<void> => {
    const d = new StaleDisk(image, blockBytes, bits, { needed: (block) => control?.broadcast('BLOCK_NEEDED', { block }) });
    nbd = await NbdServer.listen(
      { path: paths.staleNbd },
      {
        exports: {
          disk0: {
            size: d.size,
            read: (offset, length) => d.read(offset, length),
            write: (offset, data) => d.write(offset, data),
            flush: () => d.flush(),
            writeZeroes: (offset, length) => d.write(offset, Buffer.alloc(length)),
          },
        },
        onError: (err) => log('NBD', { error: err.message }),
      },
    );
    disk = d;
  };
  const quit = async (reason: string): Promise<void> => {
    log('stopping', { reason, staleBlocks: disk?.staleBlocks().length ?? null });
    await nbd?.close();
    await image.flush().catch(() => undefined);
    await image.close().catch(() => undefined);
    fs.rmSync(paths.stalePid, { force: true });
    await control?.close();
    setTimeout(() => process.exit(0), 50);
  };
  const commands = new Map<string, (args: JsonObject, att: Buffer | null) => Promise<{ ret?: JsonObject }> | { ret?: JsonObject }>();
  commands.set('set-stale', async (args, att) => {
    const blockBytes = args.blockBytes;
    if (typeof blockBytes !== 'number' || !Number.isInteger(blockBytes) || blockBytes < 4096 || (blockBytes & (blockBytes - 1)) !== 0) {
      throw new HypervisorError('InvalidArgument', 'argument "blockBytes" must be a power of two from 4096');
    }
    const expected = Math.ceil(Math.ceil(image.sizeBytes / blockBytes) / 8);
    if (!att || att.length !== expected) throw new HypervisorError('InvalidArgument', `the stale bitmap must be ${expected} bytes for this disk at ${blockBytes}-byte blocks`);
    if (disk) throw new HypervisorError('InvalidState', 'the stale set was given already');
    await serve(blockBytes, Buffer.from(att));
    log('serving the disk', { staleBlocks: disk!.staleBlocks().length, blockBytes });
    return { ret: { staleBlocks: disk!.staleBlocks().length } };
  });
  commands.set('query-stale', () => {
    const d = disk;
    if (!d) return { ret: { blockBytes: null, count: 0, blocks: [], waiting: [], waits: 0, longestWaitMs: 0, totalWaitMs: 0 } };
    return { ret: { blockBytes: d.blockBytes, count: d.staleBlocks().length, blocks: d.staleBlocks(), waiting: d.waiting(), ...d.waitStats() } };
  });
  commands.set('deliver-blocks', async (args, att) => {
    const d = disk;
    if (!d) return { ret: { applied: 0, discarded: Array.isArray(args.items) ? args.items.length : 0, staleBlocks: 0 } };
    const items = args.items as { block: number; length: number }[] | undefined;
    if (args.blockBytes !== d.blockBytes) throw new HypervisorError('InvalidArgument', `stale blocks are ${d.blockBytes} bytes: deliver at that block size`);
    if (!Array.isArray(items) || !att) throw new HypervisorError('InvalidArgument', 'deliver-blocks takes items [{block, length}] and their bytes as the attachment');
    let at = 0;
    let applied = 0;
    for (const it of items) {
      const want = Math.min(d.blockBytes, d.size - it.block * d.blockBytes);
      if (!Number.isInteger(it.block) || it.block < 0 || want <= 0 || it.length !== want || at + want > att.length) {
        throw new HypervisorError('InvalidArgument', `block ${JSON.stringify(it.block)} of length ${JSON.stringify(it.length)} is not a block of this disk`);
      }
      if (await d.deliver(it.block, att.subarray(at, at + want))) applied++;
      at += want;
    }
    return { ret: { applied, discarded: items.length - applied, staleBlocks: d.staleBlocks().length } };
  });
  commands.set('quit', () => {
    setImmediate(() => void quit('quit command'));
    return { ret: {} };
  });
  control = new ControlServer(vmId, commands, log);
  fs.rmSync(paths.staleControl, { force: true });
  await control.listen(paths.staleControl);
  fs.writeFileSync(paths.stalePid, String(process.pid));
  log('postcopy disk server ready');
  process.on('SIGTERM', () => void quit('SIGTERM'));
  process.on('SIGHUP', () => undefined);
}

main().catch((err: unknown) => {
  process.stderr.write(`postcopy disk server failed: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
});
