// VmHandle over one control-socket connection to a running simulated VM process.
import type { VmId } from '../../common/types';
import type {
  BitmapInfo,
  BitmapSnapshot,
  DiskAccess,
  GuestReport,
  IncomingStream,
  OutgoingStream,
  StaleWaitStats,
  StreamLimits,
  StreamProgress,
  VerifyResult,
  VmHandle,
  VmStatus,
} from '../driver';
import { connectToStream, listenForStream, socketChunks, streamMilestones, streamSocketPath } from '../stream-socket';
import type { ControlClient } from '../control/client';
import { FileDiskAccess } from '../file-disk';
import { HypervisorError } from '../errors';
import type { JsonObject } from '../control/protocol';

const DELIVERY_BYTES_PER_COMMAND = 32 << 20;
/** How long the VM process may take to connect to (or listen on) a stream socket. */
const STREAM_CONNECT_MS = 10_000;

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
    fill: r.fill === true,
    throttle: (r.throttle as number) ?? 0,
    accel: (r.accel as string) ?? 'sim',
    ...(r.exit ? { exit: r.exit as unknown as VmStatus['exit'] } : {}),
    guest: (r.guest as unknown as GuestReport | null) ?? null,
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

function toProgress(r: JsonObject): StreamProgress {
  return {
    status: r.status as StreamProgress['status'],
    transferredBytes: (r.transferredBytes as number) ?? 0,
    remainingBytes: (r.remainingBytes as number) ?? 0,
    totalBytes: (r.totalBytes as number) ?? 0,
    iterations: (r.iterations as number) ?? 0,
    expectedDowntimeMs: (r.expectedDowntimeMs as number | null) ?? null,
    dirtyBytesPerSecond: (r.dirtyBytesPerSecond as number) ?? 0,
    throttle: (r.throttle as number) ?? 0,
    downtimeMs: (r.downtimeMs as number | null) ?? null,
    ...(r.error ? { error: r.error as string } : {}),
  };
}

export class SimVmHandle implements VmHandle {
  constructor(
    readonly vmId: VmId,
    private readonly client: ControlClient,
    private readonly diskFile: string,
    /** Another connection to the same VM (a stream outlives the handle that started it). */
    private readonly connect: () => Promise<ControlClient>,
    private readonly verifier: (handle: SimVmHandle) => Promise<VerifyResult>,
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
        this.client.request('query-status').then(
          (r) => check({ state: r.ret.state as string, ops: ((r.ret.guest as JsonObject | null)?.ops as number) ?? -1 }),
          () => undefined,
        );
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

  openDisk(): Promise<DiskAccess> {
    return FileDiskAccess.open(this.diskFile);
  }

  async migrateOut(limits: StreamLimits): Promise<OutgoingStream> {
    const client = await this.connect();
    const listener = await listenForStream(`${this.vmId}-out`);
    try {
      const events = streamEvents(client);
      await client.request('migrate', { uri: `unix:${listener.path}`, ...limits });
      const socket = await listener.accepted(STREAM_CONNECT_MS);
      const done = events.completed.finally(() => {
        client.close();
        void listener.close();
      });
      done.catch(() => undefined);
      return {
        chunks: socketChunks(socket),
        ready: events.ready,
        completed: done.then(async () => toProgress({ status: 'completed', ...events.last })),
        continue: async () => void (await client.request('migrate-continue')),
        setLimits: async (l) => void (await client.request('migrate-set-parameters', { ...l })),
        progress: async () => toProgress((await client.request('query-migrate')).ret),
        cancel: async () => {
          if (!client.closed) await client.request('migrate-cancel');
        },
      };
    } catch (err) {
      client.close();
      await listener.close();
      throw err;
    }
  }

  async migrateIn(): Promise<IncomingStream> {
    const client = await this.connect();
    try {
      const events = streamEvents(client);
      const path = await streamSocketPath(`${this.vmId}-in`);
      await client.request('migrate-incoming', { uri: `unix:${path}` });
      const writer = await connectToStream(path, STREAM_CONNECT_MS);
      const completed = events.completed.then(() => undefined).finally(() => client.close());
      completed.catch(() => undefined);
      return {
        write: (chunk) => writer.write(chunk),
        completed,
        close: () => {
          writer.close();
          client.close();
        },
      };
    } catch (err) {
      client.close();
      throw err;
    }
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

  async staleWaits(): Promise<StaleWaitStats> {
    const r = (await this.client.request('query-stale')).ret;
    return { waits: r.waits as number, longestWaitMs: r.longestWaitMs as number, totalWaitMs: r.totalWaitMs as number };
  }

  async endPostcopy(): Promise<void> {
    await this.client.request('end-postcopy');
  }

  async nextHeartbeat(sinceMs: number, timeoutMs: number): Promise<number | null> {
    const r = await this.client.request('wait-heartbeat', { since: sinceMs, timeoutMs: Math.round(timeoutMs) }, undefined, timeoutMs + 5_000);
    return (r.ret.at as number | null) ?? null;
  }

  verify(): Promise<VerifyResult> {
    return this.verifier(this);
  }

  async hashes(): Promise<{ disk: string; memory: string }> {
    const r = await this.client.request('hashes');
    return { disk: r.ret.disk as string, memory: r.ret.memory as string };
  }

  close(): void {
    this.client.close();
  }
}

/** MIGRATION events of one stream: `ready` at the switchover point, `completed` at its end. */
function streamEvents(client: ControlClient): { ready: Promise<void>; completed: Promise<void>; last: JsonObject } {
  const state = { last: {} as JsonObject };
  const { ready, done: completed, reachReady: onReady, finish: onDone, fail: onFail } = streamMilestones();
  const off = client.onEvent((e) => {
    if (e.event !== 'MIGRATION') return;
    const status = e.data.status as string;
    if (status === 'ready') onReady();
    else if (status === 'completed') {
      off();
      client.request('query-migrate').then(
        (r) => {
          state.last = r.ret;
          onDone();
        },
        () => onDone(),
      );
    } else if (status === 'failed' || status === 'cancelled') {
      off();
      onFail(new HypervisorError('MigrationFailed', `the machine-state stream ${status}${e.data.error ? `: ${String(e.data.error)}` : ''}`));
    }
  });
  client.onClose(() => onFail(new HypervisorError('VmNotRunning', 'the VM process went away during the machine-state stream')));
  return {
    ready,
    completed,
    get last() {
      return state.last;
    },
  };
}
