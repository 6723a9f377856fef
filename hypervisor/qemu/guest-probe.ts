// The host side of the guest program's channel (guest/PROTOCOL.md): a client of the unix socket
// QEMU listens on (-chardev socket,server=on,wait=off) for the guest's second serial port.
//
// Every heartbeat is stamped with this host's monotonic clock when it arrives: the guest's own
// clock stops with the VM, so only the host can see how long it was frozen. The longest gap
// between consecutive heartbeats over a window is how Ferry measures downtime (longestGap()).
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseGuestLine, type GuestCounters, type GuestLine, type GuestViolation } from './guest-lines';
import type { GuestWorkload } from './guest-params';

/**
 * The host clock the probe stamps heartbeats with: ms since the epoch, but monotonic (the process's
 * time origin plus its monotonic clock, as the simulator's nowMs), so a wall-clock step is no gap.
 */
export const hostNow = (): number => performance.timeOrigin + performance.now();

export interface Heartbeat extends GuestCounters {
  /** hostNow() when the line arrived. */
  at: number;
}

export interface HeartbeatGap {
  /** Longest time without a heartbeat in the window (ms), counting the open gap up to `to`. */
  longestMs: number;
  /** hostNow() of the heartbeat before the longest gap (or of its start) and of the one after (or `to`). */
  from: number;
  to: number;
  /** Heartbeats that arrived in the window. */
  heartbeats: number;
  /** Heartbeats the guest sent that did not arrive (sequence numbers skipped in the window). */
  missed: number;
}

export interface VerifyResult {
  checked: number;
  violations: number;
  unreadable: number;
  /** The guest's own time for the pass (its clock stops while the VM is paused). */
  guestMs: number;
  /** The violations it reported while verifying (at most 100 a second are reported; `violations` counts all). */
  reported: GuestViolation[];
}

export class GuestCommandError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'GuestCommandError';
  }
}

export interface GuestProbeOptions {
  /** How long connect() waits for QEMU's socket to accept (it appears when QEMU starts). Default 30 s. */
  connectTimeoutMs?: number;
  /** After a drop, how long to keep reconnecting before giving up ('lost'). Default 60 s. */
  reconnectTimeoutMs?: number;
  /** Arrivals kept for gap queries; default 2^18 (about 22 minutes at one per 5 ms). */
  historySize?: number;
}

interface Pending {
  command: string;
  resolve(fields: Record<string, string>): void;
  reject(err: Error): void;
}

export interface GuestProbeEvents {
  heartbeat: [Heartbeat];
  violation: [GuestViolation];
  ready: [Record<string, string>];
  fatal: [string];
  'io-error': [Record<string, string>, string];
  connected: [];
  disconnected: [];
  lost: [Error];
}

const RECONNECT_EVERY_MS = 100;

export class GuestProbe extends EventEmitter<GuestProbeEvents> {
  private socket: net.Socket | null = null;
  private buffered = '';
  private closed = false;
  private lostError: Error | null = null;
  private disconnectedAt: number | null = null;
  private nextId = 0;
  private readonly pending = new Map<string, Pending>();
  private readonly arrivals: Float64Array;
  private readonly seqs: Float64Array;
  private count = 0;
  private last: Heartbeat | null = null;
  private longestSeen = 0;
  private readyFields: Record<string, string> | null = null;
  private fatalMessage: string | null = null;

  private constructor(
    readonly socketPath: string,
    private readonly opts: Required<GuestProbeOptions>,
  ) {
    super();
    this.arrivals = new Float64Array(opts.historySize);
    this.seqs = new Float64Array(opts.historySize);
  }

  /** Connects to QEMU's socket for the guest's channel, waiting for it to appear. */
  static async connect(socketPath: string, opts: GuestProbeOptions = {}): Promise<GuestProbe> {
    const probe = new GuestProbe(socketPath, {
      connectTimeoutMs: opts.connectTimeoutMs ?? 30_000,
      reconnectTimeoutMs: opts.reconnectTimeoutMs ?? 60_000,
      historySize: opts.historySize ?? 2 ** 18,
    });
    const deadline = hostNow() + probe.opts.connectTimeoutMs;
    let lastError = '';
    while (hostNow() < deadline) {
      try {
        await probe.open();
        return probe;
      } catch (err) {
        lastError = err instanceof Error ? err.message : String(err);
        await sleep(RECONNECT_EVERY_MS);
      }
    }
    throw new Error(`cannot connect to the guest channel ${socketPath} within ${probe.opts.connectTimeoutMs} ms (${lastError}): is QEMU running with -chardev socket,path=${socketPath},server=on,wait=off?`);
  }

  get connected(): boolean {
    return this.socket !== null;
  }

  /** The newest heartbeat, or null before the first. */
  latest(): Heartbeat | null {
    return this.last;
  }

  /** The longest gap between consecutive heartbeats this probe has seen (ms). */
  get maxGapMs(): number {
    return this.longestSeen;
  }

  /** hostNow() of the first heartbeat that arrived at or after `sinceMs`, waiting up to `timeoutMs`; null if none came. */
  async nextHeartbeat(sinceMs: number, timeoutMs: number): Promise<number | null> {
    const deadline = hostNow() + timeoutMs;
    for (;;) {
      const first = this.count > 0 ? this.arrivalsSince(sinceMs).find((a) => a.at >= sinceMs) : undefined;
      if (first) return first.at;
      if (hostNow() >= deadline) return null;
      await this.nextEvent(['heartbeat'], deadline - hostNow());
    }
  }

  /** A point on the host clock to measure gaps from (gapSince). */
  mark(): number {
    return hostNow();
  }

  /** The longest gap between heartbeats from `mark` to `to` (default now, counting a gap still open). */
  gapSince(mark: number, to = hostNow()): HeartbeatGap {
    return longestGap([this], mark, to);
  }

  /** Heartbeat arrivals (host time, sequence number) from `from` on, oldest first. */
  arrivalsSince(from: number): { at: number; seq: number }[] {
    const size = this.arrivals.length;
    const kept = Math.min(this.count, size);
    const out: { at: number; seq: number }[] = [];
    let i = this.count - 1;
    for (; i >= this.count - kept; i--) {
      const at = this.arrivals[i % size];
      if (at < from) break;
      out.push({ at, seq: this.seqs[i % size] });
    }
    if (i >= 0 && i < this.count - kept) {
      throw new RangeError(`gap query from ${from.toFixed(0)} reaches past the ${size} heartbeats kept: give GuestProbe a larger historySize`);
    }
    // The heartbeat just before the window: a gap that straddles its start counts whole.
    if (i >= 0) out.push({ at: this.arrivals[i % size], seq: this.seqs[i % size] });
    return out.reverse();
  }

  /** Resolves with the guest's ready fields (its FERRY-READY line, or `info` if the probe connected after it). */
  async waitReady(opts: { timeoutMs?: number } = {}): Promise<Record<string, string>> {
    const timeoutMs = opts.timeoutMs ?? 60_000;
    const deadline = hostNow() + timeoutMs;
    while (!this.readyFields) {
      if (this.fatalMessage) throw new Error(`the guest failed: ${this.fatalMessage}`);
      if (this.last) {
        this.readyFields = await this.command('info', { timeoutMs: Math.max(1000, deadline - hostNow()) });
        break;
      }
      if (hostNow() > deadline) {
        throw new Error(
          `no ready line or heartbeat from the guest on ${this.socketPath} within ${timeoutMs} ms (connected: ${this.connected ? 'yes' : 'no'}): ` +
            'it may still be booting (a slow host?) or have failed: see the VM console log',
        );
      }
      await this.nextEvent(['ready', 'heartbeat', 'fatal'], deadline - hostNow());
    }
    return this.readyFields;
  }

  /** Waits for a heartbeat that satisfies `until` (e.g. enough ops). */
  async waitForHeartbeat(until: (hb: Heartbeat) => boolean, opts: { timeoutMs?: number } = {}): Promise<Heartbeat> {
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const deadline = hostNow() + timeoutMs;
    for (;;) {
      if (this.last && until(this.last)) return this.last;
      if (this.fatalMessage) throw new Error(`the guest failed: ${this.fatalMessage}`);
      if (hostNow() > deadline) {
        const last = this.last ? `the last heartbeat (seq ${this.last.seq}, ${(hostNow() - this.last.at).toFixed(0)} ms ago): ${JSON.stringify(this.last)}` : 'no heartbeat yet';
        throw new Error(`the guest on ${this.socketPath} did not reach the awaited state within ${timeoutMs} ms; ${last}`);
      }
      await this.nextEvent(['heartbeat', 'fatal'], deadline - hostNow());
    }
  }

  /**
   * Sends one command (PROTOCOL.md: ping, info, stats, rate N, workload W, verify, io-reset) and
   * resolves with the reply's fields; an `err` reply rejects with a GuestCommandError.
   */
  command(line: string, opts: { timeoutMs?: number } = {}): Promise<Record<string, string>> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const id = `c${++this.nextId}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        const hb = this.last ? `the last heartbeat arrived ${(hostNow() - this.last.at).toFixed(0)} ms ago` : 'no heartbeat has arrived';
        reject(new Error(`the guest did not answer "${line}" (id ${id}) within ${timeoutMs} ms on ${this.socketPath}; ${hb}: the VM may be paused or the guest hung (see its console log)`));
      }, timeoutMs);
      const settle = { command: line, resolve: (f: Record<string, string>) => (clearTimeout(timer), resolve(f)), reject: (e: Error) => (clearTimeout(timer), reject(e)) };
      this.pending.set(id, settle);
      this.sendWhenConnected(`${id} ${line}\n`, settle, hostNow() + timeoutMs);
    });
  }

  async stats(): Promise<Record<string, string>> {
    return this.command('stats');
  }

  async setRate(opsPerSecond: number): Promise<void> {
    await this.command(`rate ${opsPerSecond}`);
  }

  async setWorkload(workload: GuestWorkload): Promise<Record<string, string>> {
    return this.command(`workload ${workload}`);
  }

  /** The end-of-test oracle: the guest reads every block and checks it against its version table. */
  async verify(opts: { timeoutMs?: number } = {}): Promise<VerifyResult> {
    const reported: GuestViolation[] = [];
    const collect = (v: GuestViolation): void => {
      if (v.source === 'verify') reported.push(v);
    };
    this.on('violation', collect);
    try {
      const f = await this.command('verify', { timeoutMs: opts.timeoutMs ?? 600_000 });
      return { checked: Number(f.checked), violations: Number(f.violations), unreadable: Number(f.unreadable), guestMs: Number(f.ms), reported };
    } finally {
      this.off('violation', collect);
    }
  }

  close(): void {
    this.closed = true;
    this.socket?.destroy();
    this.socket = null;
    this.failPending(new Error(`the guest probe for ${this.socketPath} was closed`));
  }

  private open(): Promise<void> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(this.socketPath);
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        this.attach(socket);
        resolve();
      });
    });
  }

  private attach(socket: net.Socket): void {
    this.socket = socket;
    this.buffered = '';
    this.disconnectedAt = null;
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', () => undefined); // 'close' follows
    socket.on('close', () => this.onClose(socket));
    this.emit('connected');
  }

  private onData(chunk: string): void {
    const at = hostNow();
    this.buffered += chunk;
    let nl: number;
    while ((nl = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, nl).replace(/\r$/, '');
      this.buffered = this.buffered.slice(nl + 1);
      this.onLine(parseGuestLine(line), at);
    }
    if (this.buffered.length > 64 * 1024) this.buffered = ''; // not the guest's protocol: drop rather than grow
  }

  private onLine(line: GuestLine, at: number): void {
    switch (line.kind) {
      case 'heartbeat': {
        const hb: Heartbeat = { ...line.counters, at };
        const slot = this.count % this.arrivals.length;
        this.arrivals[slot] = at;
        this.seqs[slot] = hb.seq;
        this.count++;
        if (this.last) this.longestSeen = Math.max(this.longestSeen, at - this.last.at);
        this.last = hb;
        this.emit('heartbeat', hb);
        break;
      }
      case 'violation':
        this.emit('violation', line.violation);
        break;
      case 'reply': {
        const pending = this.pending.get(line.id);
        if (!pending) break; // a reply to a command that timed out, or from before a reconnect
        this.pending.delete(line.id);
        if (line.ok) pending.resolve(line.fields);
        else pending.reject(new GuestCommandError(line.code, `the guest refused "${pending.command}": ${line.code}: ${line.message}`));
        break;
      }
      case 'ready':
        this.readyFields = line.fields;
        this.emit('ready', line.fields);
        break;
      case 'fatal':
        this.fatalMessage = line.message;
        this.emit('fatal', line.message);
        break;
      case 'io-error':
        this.emit('io-error', line.fields, line.text);
        break;
      case 'other':
        break; // e.g. the tail of a line that began before this connection
    }
  }

  private onClose(socket: net.Socket): void {
    if (this.socket !== socket) return;
    this.socket = null;
    this.disconnectedAt = hostNow();
    this.failPending(new Error(`the connection to the guest channel ${this.socketPath} dropped: the command may or may not have run`));
    if (this.closed) return;
    this.emit('disconnected');
    void this.reconnect();
  }

  private async reconnect(): Promise<void> {
    while (!this.closed && !this.socket) {
      if (hostNow() - (this.disconnectedAt ?? hostNow()) > this.opts.reconnectTimeoutMs) {
        this.lostError = new Error(`the guest channel ${this.socketPath} has not accepted a connection for ${this.opts.reconnectTimeoutMs} ms: QEMU is gone?`);
        this.emit('lost', this.lostError);
        return;
      }
      await sleep(RECONNECT_EVERY_MS);
      if (this.closed) return;
      await this.open().catch(() => undefined);
    }
  }

  /** Writes now, or once the socket is back (a command sent while reconnecting waits within its timeout). */
  private sendWhenConnected(data: string, pending: Pending, deadline: number): void {
    if (this.closed) return pending.reject(new Error(`the guest probe for ${this.socketPath} is closed`));
    if (this.lostError) return pending.reject(this.lostError);
    if (this.socket) {
      this.socket.write(data);
      return;
    }
    const retry = (): void => this.sendWhenConnected(data, pending, deadline);
    this.once('connected', retry);
    setTimeout(() => this.off('connected', retry), Math.max(0, deadline - hostNow())).unref();
  }

  private failPending(err: Error): void {
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      p.reject(err);
    }
  }

  private nextEvent(names: (keyof GuestProbeEvents)[], timeoutMs: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        for (const n of names) this.off(n, done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, timeoutMs));
      for (const n of names) this.on(n, done);
    });
  }
}

/**
 * The longest gap between consecutive heartbeats from `from` to `to`, over the arrivals of several
 * probes merged (a migration's source and destination: the same guest on two QEMUs, one running at
 * a time). A gap still open at `to` counts. This is the downtime the guest had, on the host's clock.
 */
export function longestGap(probes: GuestProbe[], from: number, to = hostNow()): HeartbeatGap {
  const arrivals = probes.flatMap((p) => p.arrivalsSince(from)).sort((a, b) => a.at - b.at);
  let longestMs = 0;
  let gapFrom = from;
  let gapTo = from;
  let heartbeats = 0;
  let missed = 0;
  let prev: { at: number; seq: number } | null = null;
  for (const a of arrivals) {
    if (a.at > to) break;
    if (a.at >= from) heartbeats++;
    if (prev) {
      if (a.at - prev.at > longestMs) [longestMs, gapFrom, gapTo] = [a.at - prev.at, prev.at, a.at];
      if (a.seq > prev.seq + 1) missed += a.seq - prev.seq - 1;
    }
    prev = a;
  }
  const openFrom = prev ? prev.at : from;
  if (to - openFrom > longestMs) [longestMs, gapFrom, gapTo] = [to - openFrom, openFrom, to];
  return { longestMs, from: gapFrom, to: gapTo, heartbeats, missed };
}
