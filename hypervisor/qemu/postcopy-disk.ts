// The destination QEMU's disk during postcopy. At the commit (guest still paused) the driver starts
// the postcopy disk server (stale-disk-main.ts, detached, like QEMU) and moves QEMU's raw node
// `disk0` onto an NBD child served by it; when the last stale block is in, it moves `disk0` back to
// the image file while the guest runs (blockdev-add + blockdev-reopen + blockdev-del: DESIGN.md
// "The QEMU driver") and stops the server. The bitmaps stay on `disk0` throughout.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { logTail } from '../log-tail';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BitmapSnapshot, StaleWaitStats } from '../driver';
import { nodeEntryArgs } from '../../common/node-entry';
import { ControlClient } from '../control/client';
import { HypervisorError } from '../errors';
import { DISK_FILE_NODE, DISK_NBD_NODE, DISK_NODE } from './command-line';
import type { QmpClient as Qmp } from './qmp/client';
import { isProcessOf, type QemuVmPaths } from './vm-files';
import { readPidFile } from '../process-files';

const SERVER_MAIN = path.join(__dirname, 'stale-disk-main');
const START_TIMEOUT_MS = 20_000;
/** How long QEMU holds the guest's I/O while the server is away (an agent cannot restart it, but a SIGSTOP ends). */
const RECONNECT_DELAY_S = 300;
const NO_WAITS: StaleWaitStats = { waits: 0, longestWaitMs: 0, totalWaitMs: 0 };

export class PostcopyDisk {
  private client: ControlClient | null = null;
  private connecting: Promise<ControlClient | null> | null = null;
  private readonly listeners = new Set<(block: number) => void>();

  constructor(
    private readonly paths: QemuVmPaths,
    private readonly vmId: string,
  ) {}

  private get statsFile(): string {
    return path.join(this.paths.staleDir, 'stats.json');
  }

  private serverPid(): number | null {
    const pid = readPidFile(this.paths.stalePid);
    return pid !== null && isProcessOf(pid, this.paths.dir) ? pid : null;
  }

  /** The server's control connection, or null when no postcopy runs. */
  private async connection(): Promise<ControlClient | null> {
    if (this.client && !this.client.closed) return this.client;
    if (this.serverPid() === null) return null;
    this.connecting ??= ControlClient.connect(this.paths.staleControl, { expectVmId: this.vmId, timeoutMs: 5_000 })
      .then((c) => {
        this.client = c;
        c.onEvent((e) => {
          if (e.event === 'BLOCK_NEEDED') for (const cb of this.listeners) cb(e.data.block as number);
        });
        c.onClose(() => void (this.client === c && (this.client = null)));
        return c;
      })
      .finally(() => (this.connecting = null));
    return this.connecting;
  }

  /**
   * When the incoming stream begins: the server starts (a process start takes a second or two on a
   * busy host) and waits for the stale set, so that the freeze does not wait for it.
   */
  async prepare(): Promise<void> {
    if (this.serverPid() !== null) return;
    fs.mkdirSync(this.paths.staleDir, { recursive: true });
    fs.rmSync(this.statsFile, { force: true });
    await this.startServer();
  }

  /** With the guest paused: serve the disk from the stale map. No stale block: nothing to do. */
  async begin(qmp: Qmp, stale: BitmapSnapshot): Promise<void> {
    if (stale.count === 0) return;
    await this.prepare();
    const client = await this.connection();
    if (!client) throw new HypervisorError('GenericError', `the postcopy disk server of VM ${this.vmId} did not stay up: see ${this.paths.staleLog}`);
    await client.request('set-stale', { blockBytes: stale.blockBytes }, stale.bits);
    await qmp.execute('blockdev-add', {
      driver: 'nbd',
      'node-name': DISK_NBD_NODE,
      server: { type: 'unix', path: this.paths.staleNbd },
      export: 'disk0',
      'reconnect-delay': RECONNECT_DELAY_S,
    });
    await qmp.execute('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': DISK_NODE, file: DISK_NBD_NODE }] });
    await qmp.execute('blockdev-del', { 'node-name': DISK_FILE_NODE });
    // Blocks the guest may already wait for are announced again to listeners that came before the server.
    for (const b of (await client.request('query-stale')).ret.waiting as number[]) for (const cb of this.listeners) cb(b);
  }

  private async startServer(): Promise<void> {
    const logFd = fs.openSync(this.paths.staleLog, 'a');
    let exited: string | null = null;
    try {
      const child = spawn(process.execPath, [...nodeEntryArgs(SERVER_MAIN), this.paths.dir], { detached: true, stdio: ['ignore', logFd, logFd] });
      child.on('exit', (code, signal) => (exited = signal ?? String(code)));
      child.unref();
    } finally {
      fs.closeSync(logFd);
    }
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (this.serverPid() === null) {
      if (exited !== null || Date.now() > deadline) {
        throw new HypervisorError('GenericError', `the postcopy disk server of VM ${this.vmId} did not start (${exited ?? 'timeout'}): ${logTail(this.paths.staleLog)}`);
      }
      await sleep(20);
    }
  }

  async deliver(blockBytes: number, items: { block: number; data: Buffer }[]): Promise<number> {
    const client = await this.connection();
    if (!client) return 0; // no postcopy: nothing is stale, every delivery is late
    const r = await client.request(
      'deliver-blocks',
      { blockBytes, items: items.map((it) => ({ block: it.block, length: it.data.length })) },
      Buffer.concat(items.map((it) => it.data)),
    );
    return r.ret.applied as number;
  }

  onBlockNeeded(cb: (block: number) => void): () => void {
    this.listeners.add(cb);
    void this.connection().then(
      async (c) => {
        if (!c || !this.listeners.has(cb)) return;
        for (const b of (await c.request('query-stale')).ret.waiting as number[]) cb(b);
      },
      () => undefined,
    );
    return () => void this.listeners.delete(cb);
  }

  async staleBlocks(): Promise<number[]> {
    const client = await this.connection();
    return client ? ((await client.request('query-stale')).ret.blocks as number[]) : [];
  }

  async waitStats(): Promise<StaleWaitStats> {
    const client = await this.connection();
    if (client) {
      const r = (await client.request('query-stale')).ret;
      return { waits: r.waits as number, longestWaitMs: r.longestWaitMs as number, totalWaitMs: r.totalWaitMs as number };
    }
    try {
      return JSON.parse(fs.readFileSync(this.statsFile, 'utf8')) as StaleWaitStats;
    } catch {
      return NO_WAITS;
    }
  }

  /** The last stale block is in: the disk is the image file again, the server stops. */
  async end(qmp: Qmp): Promise<void> {
    const client = await this.connection();
    if (!client) return;
    const stale = (await client.request('query-stale')).ret;
    if ((stale.count as number) > 0) throw new HypervisorError('InvalidState', `${String(stale.count)} blocks are still stale: deliver them first`);
    fs.writeFileSync(this.statsFile, JSON.stringify({ waits: stale.waits, longestWaitMs: stale.longestWaitMs, totalWaitMs: stale.totalWaitMs }));
    if (stale.blockBytes !== null) await this.toImage(qmp);
    const pid = this.serverPid();
    await client.request('quit').catch(() => undefined);
    client.close();
    this.client = null;
    const deadline = Date.now() + 10_000;
    while (pid !== null && isProcessOf(pid, this.paths.dir) && Date.now() < deadline) await sleep(20);
  }

  private async toImage(qmp: Qmp): Promise<void> {
    const nodes = await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
    if (!nodes.some((n) => n['node-name'] === DISK_FILE_NODE)) {
      await qmp.execute('blockdev-add', { driver: 'file', 'node-name': DISK_FILE_NODE, filename: this.paths.disk });
    }
    await qmp.execute('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': DISK_NODE, file: DISK_FILE_NODE }] });
    if (nodes.some((n) => n['node-name'] === DISK_NBD_NODE)) await qmp.execute('blockdev-del', { 'node-name': DISK_NBD_NODE });
  }

  /** The VM is destroyed: its server goes too. */
  kill(): void {
    const pid = this.serverPid();
    if (pid !== null) process.kill(pid, 'SIGKILL');
    this.client?.close();
    this.client = null;
  }
}
