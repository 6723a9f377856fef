// VmHandle over one control-socket connection to a running VM process.
import { PAGE_BYTES, type VmId } from '../../common/types';
import type { BitmapInfo, BitmapSnapshot, DiskAccess, PageRun, VmHandle, VmStatus } from '../driver';
import type { ControlClient } from './control-client';
import { FileDiskAccess } from './disk-access';
import { HypervisorError } from './errors';
import type { JsonObject } from './protocol';

/** Pages and blocks per command: well under the protocol's attachment limit. */
const PAGES_PER_COMMAND = 4096; // 16 MiB
const DELIVERY_BYTES_PER_COMMAND = 32 << 20;

export function toVmStatus(r: JsonObject): VmStatus {
  return {
    vmId: r.vmId as VmId,
    state: r.state as VmStatus['state'],
    pid: (r.pid as number | null) ?? null,
    diskBytes: r.diskBytes as number,
    memoryBytes: r.memoryBytes as number,
    workload: r.workload as VmStatus['workload'],
    seed: r.seed as number,
    opsPerSecond: r.opsPerSecond as number,
    ops: r.ops as number,
    violations: r.violations as number,
    maxGapMs: r.maxGapMs as number,
    resumeGapMs: (r.resumeGapMs as number | null) ?? null,
    staleWaits: r.staleWaits as number,
    staleBlocks: r.staleBlocks as number,
    throttle: r.throttle as number,
  };
}

function snapshotOf(ret: JsonObject, bits: Buffer | null): BitmapSnapshot {
  return {
    generation: ret.generation as number,
    blockBytes: ret.blockBytes as number,
    bits: bits ?? Buffer.alloc(0),
    count: ret.count as number,
  };
}

export class SimVmHandle implements VmHandle {
  constructor(
    readonly vmId: VmId,
    private readonly client: ControlClient,
    private readonly diskFile: string,
  ) {}

  get pid(): number {
    return this.client.greeting.pid;
  }

  /** Sends any control command (CONTROL-PROTOCOL.md), for what the interface does not cover. */
  command(execute: string, args: JsonObject = {}, attachment?: Buffer): Promise<{ ret: JsonObject; attachment: Buffer | null }> {
    return this.client.request(execute, args, attachment);
  }

  async status(): Promise<VmStatus> {
    return toVmStatus((await this.client.request('query-status')).ret);
  }

  async pause(): Promise<void> {
    await this.client.request('pause');
  }

  async resume(): Promise<void> {
    await this.client.request('resume');
  }

  /** Resolves once the guest halted at exactly `ops` (it keeps waiting through pauses). */
  async runUntil(ops: number): Promise<void> {
    let done = false;
    let unsubscribe = (): void => undefined;
    const halted = new Promise<void>((resolve, reject) => {
      const check = (s: { state: string; ops: number }): void => {
        if (s.state !== 'halted' || done) return;
        done = true;
        if (s.ops === ops) resolve();
        else reject(new HypervisorError('InvalidState', `the guest halted at ${s.ops} operations, not ${ops}: another runUntil changed the target`));
      };
      const offEvent = this.client.onEvent((e) => {
        if (e.event === 'HALTED') check({ state: 'halted', ops: e.data.ops as number });
      });
      const offClose = this.client.onClose(() => {
        if (!done) reject(new HypervisorError('VmNotRunning', `the VM process went away before reaching ${ops} operations`));
        done = true;
      });
      // Fallback for a missed event (e.g. halted between our command and the subscription).
      const poll = setInterval(() => {
        this.client.request('query-status').then((r) => check(r.ret as { state: string; ops: number }), () => undefined);
      }, 250);
      unsubscribe = () => {
        offEvent();
        offClose();
        clearInterval(poll);
      };
    });
    try {
      const r = await this.client.request('run-until', { ops });
      if (r.ret.state === 'halted' && r.ret.ops === ops) return;
      await halted;
    } finally {
      done = true;
      unsubscribe();
      halted.catch(() => undefined);
    }
  }

  async setThrottle(fraction: number): Promise<void> {
    await this.client.request('set-throttle', { fraction });
  }

  async saveState(): Promise<Buffer> {
    const r = await this.client.request('save-state');
    return r.attachment ?? Buffer.alloc(0);
  }

  async loadState(state: Buffer): Promise<void> {
    await this.client.request('load-state', {}, state);
  }

  async addBitmap(name: string, opts: { blockBytes: number; persistent: boolean }): Promise<void> {
    await this.client.request('bitmap-add', { name, blockBytes: opts.blockBytes, persistent: opts.persistent });
  }

  async removeBitmap(name: string): Promise<void> {
    await this.client.request('bitmap-remove', { name });
  }

  async listBitmaps(): Promise<BitmapInfo[]> {
    return (await this.client.request('bitmap-list')).ret.bitmaps as BitmapInfo[];
  }

  async snapshotBitmap(name: string): Promise<BitmapSnapshot> {
    const r = await this.client.request('bitmap-snapshot', { name });
    return snapshotOf(r.ret, r.attachment);
  }

  async ackBitmap(name: string, generation: number): Promise<void> {
    await this.client.request('bitmap-ack', { name, generation });
  }

  async startMemoryLog(): Promise<void> {
    await this.client.request('memlog-start');
  }

  async stopMemoryLog(): Promise<void> {
    await this.client.request('memlog-stop');
  }

  async snapshotMemoryLog(): Promise<BitmapSnapshot> {
    const r = await this.client.request('memlog-snapshot');
    return snapshotOf(r.ret, r.attachment);
  }

  async ackMemoryLog(generation: number): Promise<void> {
    await this.client.request('memlog-ack', { generation });
  }

  async readPages(first: number, count: number): Promise<Buffer> {
    if (count <= PAGES_PER_COMMAND) return (await this.client.request('read-pages', { first, count })).attachment as Buffer;
    const out = Buffer.allocUnsafe(count * PAGE_BYTES);
    for (let done = 0; done < count; ) {
      const n = Math.min(PAGES_PER_COMMAND, count - done);
      const r = await this.client.request('read-pages', { first: first + done, count: n });
      (r.attachment as Buffer).copy(out, done * PAGE_BYTES);
      done += n;
    }
    return out;
  }

  async writePages(first: number, data: Buffer): Promise<void> {
    if (data.length % PAGE_BYTES !== 0) {
      throw new HypervisorError('InvalidArgument', `page data is ${data.length} bytes: pass whole ${PAGE_BYTES}-byte pages`);
    }
    const count = data.length / PAGE_BYTES;
    for (let done = 0; done < count; ) {
      const n = Math.min(PAGES_PER_COMMAND, count - done);
      await this.client.request('write-pages', { first: first + done }, data.subarray(done * PAGE_BYTES, (done + n) * PAGE_BYTES));
      done += n;
    }
  }

  /** Callers keep a call within PAGES_PER_COMMAND pages (the migration sends at most 4 MiB per message). */
  async readPageRuns(runs: PageRun[]): Promise<Buffer> {
    return (await this.client.request('read-page-runs', { runs })).attachment as Buffer;
  }

  async writePageRuns(runs: PageRun[], data: Buffer): Promise<void> {
    await this.client.request('write-page-runs', { runs }, data);
  }

  async setStale(bitmap: BitmapSnapshot): Promise<void> {
    await this.client.request('set-stale', { blockBytes: bitmap.blockBytes }, bitmap.bits);
  }

  async deliverBlocks(blockBytes: number, items: { block: number; data: Buffer }[]): Promise<number> {
    let applied = 0;
    for (let i = 0; i < items.length; ) {
      const batch: { block: number; data: Buffer }[] = [];
      let bytes = 0;
      while (i < items.length && (batch.length === 0 || bytes + items[i].data.length <= DELIVERY_BYTES_PER_COMMAND)) {
        bytes += items[i].data.length;
        batch.push(items[i++]);
      }
      const r = await this.client.request(
        'deliver-blocks',
        { blockBytes, items: batch.map((it) => ({ block: it.block, length: it.data.length })) },
        Buffer.concat(batch.map((it) => it.data)),
      );
      applied += r.ret.applied as number;
    }
    return applied;
  }

  /** Calls `cb` for every block the guest waits for now, then for every new BLOCK_NEEDED event. */
  onBlockNeeded(cb: (block: number) => void): () => void {
    let active = true;
    const off = this.client.onEvent((e) => {
      if (active && e.event === 'BLOCK_NEEDED') cb(e.data.block as number);
    });
    this.client.request('query-stale').then(
      (r) => {
        if (active) for (const b of r.ret.waiting as number[]) cb(b);
      },
      () => undefined,
    );
    return () => {
      active = false;
      off();
    };
  }

  async staleBlocks(): Promise<number[]> {
    return (await this.client.request('query-stale')).ret.blocks as number[];
  }

  async hashes(): Promise<{ disk: string; memory: string }> {
    const r = await this.client.request('hashes');
    return { disk: r.ret.disk as string, memory: r.ret.memory as string };
  }

  openDisk(): Promise<DiskAccess> {
    return FileDiskAccess.open(this.diskFile);
  }

  close(): void {
    this.client.close();
  }
}
