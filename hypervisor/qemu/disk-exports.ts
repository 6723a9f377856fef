// QEMU's own NBD server on a source VM: how Ferry reads the live disk and the contents of a dirty
// bitmap without stopping the guest. One server per QEMU process (on a Unix socket in the VM's
// directory); one read-only export per reader, removed when it is done (an exported bitmap is busy:
// no merge or remove until block-export-del).
import { randomBytes } from 'node:crypto';
import type { DiskAccess } from '../driver';
import { HypervisorError } from '../errors';
import { NbdClient } from '../../nbd/client';
import type { QmpClient as Qmp } from './qmp/client';
import { DISK_NODE } from './command-line';

const EXPORT_PREFIX = 'ferry-';
/** One BLOCK_STATUS request covers at most this much (QEMU answers in extents anyway). */
const STATUS_CHUNK = 1 << 30;
/** Reads larger than this are split (QEMU's NBD server takes up to 32 MiB). */
const MAX_READ = 32 << 20;

export class DiskExports {
  private serverStarted: Promise<void> | null = null;

  constructor(
    private readonly qmp: Qmp,
    private readonly socketPath: string,
  ) {}

  /** QEMU runs one NBD server; a restarted agent finds the one its predecessor started. */
  private ensureServer(): Promise<void> {
    const started = (this.serverStarted ??= this.qmp
      .execute('nbd-server-start', { addr: { type: 'unix', data: { path: this.socketPath } } })
      .then(
        () => undefined,
        (err: Error) => {
          if (/already running/i.test(err.message)) return;
          this.serverStarted = null;
          throw err;
        },
      ));
    return started;
  }

  private async add(id: string, bitmaps: string[]): Promise<void> {
    await this.ensureServer();
    await this.qmp.execute('block-export-add', { type: 'nbd', id, 'node-name': DISK_NODE, name: id, writable: false, ...(bitmaps.length ? { bitmaps } : {}) });
  }

  private async del(id: string): Promise<void> {
    const deleted = new Promise<void>((resolve) => {
      const off = this.qmp.on('BLOCK_EXPORT_DELETED', (data) => {
        if (data.id === id) {
          off();
          resolve();
        }
      });
      setTimeout(() => {
        off();
        resolve();
      }, 5_000).unref();
    });
    try {
      await this.qmp.execute('block-export-del', { id, mode: 'hard' });
    } catch (err) {
      if (/not found|no export/i.test((err as Error).message)) return;
      throw err;
    }
    await deleted;
  }

  /** Removes exports of `bitmap`'s generations that an interrupted reader left behind. */
  async dropBitmapExports(bitmap: string): Promise<void> {
    const exports = await this.qmp.execute<{ id: string }[]>('query-block-exports');
    for (const e of exports) if (e.id.startsWith(`${EXPORT_PREFIX}bm-${bitmap}.`)) await this.del(e.id);
  }

  /** The bits of a disabled QEMU bitmap, one per `granularity` bytes of the disk, LSB first. */
  async readBitmap(bitmap: string, granularity: number, diskBytes: number): Promise<Buffer> {
    const id = `${EXPORT_PREFIX}bm-${bitmap}.${randomBytes(4).toString('hex')}`;
    await this.add(id, [bitmap]);
    try {
      const context = `qemu:dirty-bitmap:${bitmap}`;
      const client = await NbdClient.connect({ path: this.socketPath }, { exportName: id, metaContexts: [context] });
      try {
        const blocks = Math.ceil(diskBytes / granularity);
        const bits = Buffer.alloc(Math.ceil(blocks / 8));
        for (let at = 0; at < diskBytes; ) {
          const length = Math.min(STATUS_CHUNK, diskBytes - at);
          const extents = await client.blockStatus(context, at, length);
          let pos = at;
          for (const e of extents) {
            if (e.flags & 1) {
              for (let b = Math.floor(pos / granularity); b < Math.ceil((pos + e.length) / granularity); b++) bits[b >> 3] |= 1 << (b & 7);
            }
            pos += e.length;
          }
          if (pos <= at) throw new HypervisorError('GenericError', `QEMU's NBD server described no extent at offset ${at} of ${bitmap}`);
          at = pos;
        }
        return bits;
      } finally {
        await client.close();
      }
    } finally {
      await this.del(id);
    }
  }

  /** The live disk, read-only, through an export of its own (closed with the DiskAccess). */
  async openDisk(diskBytes: number): Promise<DiskAccess> {
    const id = `${EXPORT_PREFIX}rd-${randomBytes(6).toString('hex')}`;
    await this.add(id, []);
    let client: NbdClient;
    try {
      client = await NbdClient.connect({ path: this.socketPath }, { exportName: id });
    } catch (err) {
      await this.del(id);
      throw err;
    }
    return {
      sizeBytes: diskBytes,
      read: async (offset, length) => {
        if (length <= MAX_READ) return client.read(offset, length);
        const parts: Promise<Buffer>[] = [];
        for (let at = 0; at < length; at += MAX_READ) parts.push(client.read(offset + at, Math.min(MAX_READ, length - at)));
        return Buffer.concat(await Promise.all(parts));
      },
      write: async () => {
        throw new HypervisorError('InvalidState', 'a running QEMU VM\'s disk is read-only to Ferry: the guest owns it');
      },
      flush: async () => undefined,
      close: async () => {
        await client.close().catch(() => undefined);
        await this.del(id).catch(() => undefined);
      },
    };
  }
}
