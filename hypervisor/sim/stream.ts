// The simulator's machine-state stream, the counterpart of QEMU's migration stream: memory pages and
// the CPU state, written by the source VM process to a Unix socket the agent owns and read by the
// destination VM process from a socket it listens on. Iterative precopy of memory with a dirty log,
// pause-before-switchover, auto-converge, and QEMU's rule that a stream that fails before it
// completed leaves the guest running on the source. The format is in CONTROL-PROTOCOL.md.
import * as net from 'node:net';
import { once } from 'node:events';
import { PAGE_BYTES } from '../../common/types';
import { DirtyBitmap, setBits } from '../bitmap';
import type { JsonObject } from '../control/protocol';

export const StreamKind = { Header: 1, Pages: 2, State: 3, End: 4 } as const;
const FRAME_HEADER_BYTES = 5;
/** Pages per PAGES frame (4 MiB). */
const PAGES_PER_FRAME = 1024;
const MAX_FRAME_BYTES = PAGES_PER_FRAME * PAGE_BYTES + 8 * PAGES_PER_FRAME + 4;
/** Auto-converge as QEMU does it: start at 20 %, 10 % more per iteration that does not converge, at most 99 %. */
const THROTTLE_INITIAL = 0.2;
const THROTTLE_STEP = 0.1;
const THROTTLE_MAX = 0.99;

export type StreamStatus = 'setup' | 'active' | 'ready' | 'completing' | 'completed' | 'failed' | 'cancelled';

export interface StreamHeader extends JsonObject {
  format: 'ferry-sim-stream';
  version: 1;
  vmId: string;
  memoryBytes: number;
  diskBytes: number;
}

export interface OutgoingLimits {
  downtimeLimitMs: number;
  bandwidthBytesPerSecond: number | null;
  autoConverge: boolean;
}

/** What the stream needs of the machine it moves. */
export interface StreamMachine {
  readonly memory: Buffer;
  header(): StreamHeader;
  /** The dirty log of guest memory (4 KiB pages) while the stream runs; null to stop it. */
  setMemoryLog(log: DirtyBitmap | null): void;
  /** Pause the guest for the switchover; returns whether it was running. */
  pauseForSwitchover(): boolean;
  /** The stream failed or was cancelled: the guest runs on if it ran before. */
  resumeAfterFailure(wasRunning: boolean): void;
  /** The stream completed: the machine lives on the destination now. */
  migrated(): void;
  cpuState(): Buffer;
  setCpuThrottle(fraction: number): void;
  emit(event: string, data: JsonObject): void;
}

function frame(kind: number, parts: Buffer[]): Buffer[] {
  const length = parts.reduce((n, p) => n + p.length, 0);
  const head = Buffer.alloc(FRAME_HEADER_BYTES);
  head[0] = kind;
  head.writeUInt32BE(length, 1);
  return [head, ...parts];
}

export class OutgoingMigration {
  status: StreamStatus = 'setup';
  transferredBytes = 0;
  remainingBytes = 0;
  iterations = 0;
  expectedDowntimeMs: number | null = null;
  dirtyBytesPerSecond = 0;
  cpuThrottle = 0;
  downtimeMs: number | null = null;
  error: string | null = null;
  private socket: net.Socket | null = null;
  private continueRequested: (() => void) | null = null;
  private cancelled = false;
  private wasRunning = false;
  private pausedAt = 0;

  constructor(
    private readonly machine: StreamMachine,
    private limits: OutgoingLimits,
  ) {}

  progress(): JsonObject {
    return {
      status: this.status,
      transferredBytes: this.transferredBytes,
      remainingBytes: this.remainingBytes,
      totalBytes: this.machine.memory.length,
      iterations: this.iterations,
      expectedDowntimeMs: this.expectedDowntimeMs,
      dirtyBytesPerSecond: this.dirtyBytesPerSecond,
      throttle: this.cpuThrottle,
      downtimeMs: this.downtimeMs,
      ...(this.error ? { error: this.error } : {}),
    };
  }

  setLimits(limits: Partial<OutgoingLimits>): void {
    this.limits = { ...this.limits, ...limits };
  }

  get active(): boolean {
    return ['setup', 'active', 'ready', 'completing'].includes(this.status);
  }

  /** Connects to `path` and runs the stream in the background. */
  start(path: string): void {
    void this.run(path);
  }

  continue(): void {
    if (this.status !== 'ready') throw new Error(`the stream is ${this.status}, not waiting at the switchover`);
    this.continueRequested?.();
  }

  cancel(): void {
    this.cancelled = true;
    this.continueRequested?.();
    this.socket?.destroy(new Error('cancelled'));
  }

  private setStatus(status: StreamStatus): void {
    this.status = status;
    this.machine.emit('MIGRATION', { status });
  }

  private async run(path: string): Promise<void> {
    const memory = this.machine.memory;
    const pages = memory.length / PAGE_BYTES;
    const log = new DirtyBitmap(memory.length, PAGE_BYTES);
    try {
      const socket = net.connect(path);
      this.socket = socket;
      socket.on('error', () => undefined); // surfaces through write() and the close
      await once(socket, 'connect');
      this.machine.setMemoryLog(log);
      this.setStatus('active');
      await this.write(frame(StreamKind.Header, [Buffer.from(JSON.stringify(this.machine.header()))]));
      let started = performance.now();
      let sent = await this.sendPages(allPages(pages));
      this.iterations = 1;
      for (;;) {
        if (this.cancelled) throw new Error('cancelled');
        const seconds = Math.max(1e-3, (performance.now() - started) / 1000);
        const bandwidth = sent / seconds;
        const dirty = log.dirtyCount * PAGE_BYTES;
        this.remainingBytes = dirty;
        this.dirtyBytesPerSecond = Math.round(dirty / seconds);
        // Nothing dirty (a paused or idle guest) costs nothing to send, whatever the bandwidth seen.
        this.expectedDowntimeMs = dirty === 0 ? 0 : bandwidth > 0 ? (dirty / bandwidth) * 1000 : null;
        if (this.limits.downtimeLimitMs > 0 && this.expectedDowntimeMs !== null && this.expectedDowntimeMs <= this.limits.downtimeLimitMs) break;
        if (this.limits.autoConverge && this.iterations >= 2 && dirty > sent / 2) {
          this.cpuThrottle = this.cpuThrottle === 0 ? THROTTLE_INITIAL : Math.min(THROTTLE_MAX, this.cpuThrottle + THROTTLE_STEP);
          this.machine.setCpuThrottle(this.cpuThrottle);
        }
        const snap = log.snapshot();
        started = performance.now();
        sent = await this.sendPages(setBits(snap.bits));
        log.ack(snap.generation);
        this.iterations++;
        if (sent === 0) await new Promise((r) => setTimeout(r, 5)); // nothing dirty: look again shortly
      }
      this.wasRunning = this.machine.pauseForSwitchover();
      this.pausedAt = performance.now();
      this.setStatus('ready');
      await new Promise<void>((resolve) => (this.continueRequested = resolve));
      if (this.cancelled) throw new Error('cancelled');
      this.setStatus('completing');
      const last = log.snapshot();
      await this.sendPages(setBits(last.bits));
      await this.write(frame(StreamKind.State, [this.machine.cpuState()]));
      await this.write(frame(StreamKind.End, []));
      await new Promise<void>((resolve, reject) => socket.end(() => resolve()).once('error', reject));
      this.remainingBytes = 0;
      this.downtimeMs = Math.round(performance.now() - this.pausedAt);
      this.machine.setMemoryLog(null);
      this.machine.setCpuThrottle(0);
      this.machine.migrated();
      this.setStatus('completed');
    } catch (err) {
      this.error = this.cancelled ? 'cancelled' : (err as Error).message;
      this.socket?.destroy();
      this.machine.setMemoryLog(null);
      this.machine.setCpuThrottle(0);
      this.machine.resumeAfterFailure(this.wasRunning);
      this.setStatus(this.cancelled ? 'cancelled' : 'failed');
    }
  }

  /** Pages in frames of up to PAGES_PER_FRAME, paced by the socket (and the bandwidth limit, if any). */
  private async sendPages(list: number[]): Promise<number> {
    let bytes = 0;
    for (const batch of batches(list, PAGES_PER_FRAME)) {
      if (this.cancelled) throw new Error('cancelled');
      const runsBuf = Buffer.alloc(4 + 8 * batch.length);
      runsBuf.writeUInt32BE(batch.length, 0);
      const data: Buffer[] = [];
      batch.forEach(([first, count], i) => {
        runsBuf.writeUInt32BE(first, 4 + 8 * i);
        runsBuf.writeUInt32BE(count, 8 + 8 * i);
        data.push(Buffer.from(this.machine.memory.subarray(first * PAGE_BYTES, (first + count) * PAGE_BYTES)));
      });
      const started = performance.now();
      const size = await this.write(frame(StreamKind.Pages, [runsBuf, ...data]));
      bytes += size;
      const bw = this.limits.bandwidthBytesPerSecond;
      if (bw) {
        const due = (size / bw) * 1000 - (performance.now() - started);
        if (due > 1) await new Promise((r) => setTimeout(r, due));
      }
    }
    return bytes;
  }

  private async write(parts: Buffer[]): Promise<number> {
    const socket = this.socket!;
    let ok = true;
    let size = 0;
    for (const p of parts) {
      ok = socket.write(p) && ok;
      size += p.length;
    }
    this.transferredBytes += size;
    if (!ok) {
      await new Promise<void>((resolve, reject) => {
        const done = (err?: Error): void => {
          socket.off('error', done).off('close', onClose).off('drain', done);
          if (err) reject(err);
          else resolve();
        };
        const onClose = (): void => done(new Error('the migration socket closed'));
        socket.on('error', done).on('close', onClose).on('drain', done);
      });
    }
    return size;
  }
}

/** What the incoming side needs of the machine it fills. */
export interface IncomingMachine {
  readonly memory: Buffer;
  header(): StreamHeader;
  loadCpuState(state: Buffer): void;
  emit(event: string, data: JsonObject): void;
  /** The stream failed: like QEMU, the destination process gives up (the agent starts a fresh one). */
  fail(reason: string): void;
  /** Everything arrived: the guest may be resumed. */
  loaded(): void;
}

export class IncomingMigration {
  status: StreamStatus = 'setup';
  receivedBytes = 0;
  private server: net.Server | null = null;

  constructor(private readonly machine: IncomingMachine) {}

  progress(): JsonObject {
    return { status: this.status, receivedBytes: this.receivedBytes };
  }

  /** Listens on `path` for the one connection that carries the stream. */
  listen(path: string): Promise<void> {
    const server = net.createServer({ pauseOnConnect: false }, (socket) => {
      server.close();
      this.receive(socket);
    });
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        this.status = 'active';
        resolve();
      });
    });
  }

  private receive(socket: net.Socket): void {
    const input = new ChunkQueue();
    let headerSeen = false;
    let ended = false;
    const fail = (reason: string): void => {
      if (ended) return;
      ended = true;
      this.status = 'failed';
      socket.destroy();
      this.machine.emit('MIGRATION', { status: 'failed', error: reason });
      this.machine.fail(`load of migration failed: ${reason}`);
    };
    socket.on('data', (chunk: Buffer) => {
      this.receivedBytes += chunk.length;
      input.push(chunk);
      try {
        while (!ended) {
          const head = input.peek(FRAME_HEADER_BYTES);
          if (!head) break;
          const kind = head[0];
          const length = head.readUInt32BE(1);
          if (length > MAX_FRAME_BYTES) throw new Error(`a frame of ${length} bytes is over the limit of ${MAX_FRAME_BYTES}`);
          const whole = input.take(FRAME_HEADER_BYTES + length);
          if (!whole) break;
          const payload = whole.subarray(FRAME_HEADER_BYTES);
          if (!headerSeen && kind !== StreamKind.Header) throw new Error('the stream does not start with its header');
          if (kind === StreamKind.Header) {
            this.checkHeader(JSON.parse(payload.toString('utf8')) as StreamHeader);
            headerSeen = true;
          } else if (kind === StreamKind.Pages) this.applyPages(payload);
          else if (kind === StreamKind.State) this.machine.loadCpuState(Buffer.from(payload));
          else if (kind === StreamKind.End) {
            ended = true;
            this.status = 'completed';
            socket.end();
            this.machine.loaded();
            this.machine.emit('MIGRATION', { status: 'completed' });
          } else throw new Error(`unknown frame kind ${kind}`);
        }
      } catch (err) {
        fail((err as Error).message);
      }
    });
    socket.on('error', (err) => fail(err.message));
    socket.on('close', () => fail('the stream ended before it was complete'));
  }

  private checkHeader(h: StreamHeader): void {
    const mine = this.machine.header();
    for (const k of ['format', 'version', 'vmId', 'memoryBytes', 'diskBytes'] as const) {
      if (h[k] !== mine[k]) throw new Error(`the stream is for ${k}=${JSON.stringify(h[k])}, this VM has ${JSON.stringify(mine[k])}`);
    }
  }

  private applyPages(payload: Buffer): void {
    const memory = this.machine.memory;
    const pages = memory.length / PAGE_BYTES;
    const runs = payload.readUInt32BE(0);
    let at = 4 + 8 * runs;
    for (let i = 0; i < runs; i++) {
      const first = payload.readUInt32BE(4 + 8 * i);
      const count = payload.readUInt32BE(8 + 8 * i);
      if (first + count > pages || at + count * PAGE_BYTES > payload.length) throw new Error(`pages ${first}+${count} are outside the memory or the frame`);
      payload.copy(memory, first * PAGE_BYTES, at, at + count * PAGE_BYTES);
      at += count * PAGE_BYTES;
    }
  }

  close(): void {
    this.server?.close();
  }
}

/** Received chunks, joined only when a whole frame is there (no copying per chunk). */
class ChunkQueue {
  private chunks: Buffer[] = [];
  private length = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** The first `n` bytes without consuming them, or null when fewer are there. */
  peek(n: number): Buffer | null {
    if (this.length < n) return null;
    if (this.chunks[0].length < n) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0].subarray(0, n);
  }

  take(n: number): Buffer | null {
    if (this.length < n) return null;
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.length -= n;
    return out;
  }
}

function allPages(pages: number): number[] {
  return Array.from({ length: pages }, (_, i) => i);
}

/** Sorted page numbers as [first, count] runs, grouped so that a batch holds at most `max` pages. */
function batches(sorted: number[], max: number): [number, number][][] {
  const out: [number, number][][] = [];
  let batch: [number, number][] = [];
  let size = 0;
  for (const p of sorted) {
    if (size === max) {
      out.push(batch);
      batch = [];
      size = 0;
    }
    const last = batch[batch.length - 1];
    if (last && last[0] + last[1] === p) last[1]++;
    else batch.push([p, 1]);
    size++;
  }
  if (batch.length > 0) out.push(batch);
  return out;
}
