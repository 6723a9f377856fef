// Client side of the data plane (the sending host): handshake, pipelined sends with a byte window,
// bandwidth limit, and transparent resumption after a dropped connection.
import type * as net from 'node:net';
import { performance } from 'node:perf_hooks';
import {
  DataPlaneError,
  type ConnectOptions,
  type DataPlaneSession,
  type DataPlaneStats,
  type Message,
  type SendOptions,
  type SessionIdentity,
} from './api';
import { checkIdentity, checkSecret, computeProof, newNonce, newSessionId, parseChallenge, parseError, parseWelcome, proofMatches, sessionTag } from './auth';
import { TokenBucket } from './bandwidth';
import { decodeMeta, encodeFrame, encodeMeta, FrameDecoder, FrameKind, HEADER_BYTES, MAX_DATA_BYTES, MAX_META_BYTES, PROTOCOL_VERSION, wireLength, type Frame } from './frame';
import { frameToMessage, payloadOf, prepareMessage, type PreparedMessage } from './message';
import { dial, parseAddress, tuneSocket, writeParts } from './transport';

const DEFAULT_WINDOW = 8 * 1024 * 1024;
const DEFAULT_RECONNECT_TIMEOUT = 30_000;
const DEFAULT_HANDSHAKE_TIMEOUT = 10_000;
const DEFAULT_KEEPALIVE = 5_000;
const HANDSHAKE_META_LIMIT = 4096;
const FIRST_BACKOFF = 50;
const MAX_BACKOFF = 2_000;

/** Errors after which retrying cannot help: the session fails instead of reconnecting. */
const FATAL = new Set(['auth_failed', 'refused', 'bad_version', 'protocol', 'bad_config']);

type SendKind = typeof FrameKind.MSG | typeof FrameKind.REQUEST;

interface Entry extends PreparedMessage {
  kind: SendKind;
  seq: number;
  written: boolean;
  urgent: boolean;
  reply?: { resolve: (m: Message) => void; reject: (e: Error) => void };
}

interface Waiter {
  entry: Entry;
  resolve: () => void;
  reject: (e: Error) => void;
}

class Conn {
  lastRx = performance.now();
  lastTx = performance.now();
  keepalive: NodeJS.Timeout | null = null;
  constructor(
    readonly socket: net.Socket,
    readonly decoder: FrameDecoder,
  ) {}
}

export async function connect(opts: ConnectOptions): Promise<DataPlaneSession> {
  const session = new ClientSession(opts);
  await session.start();
  return session;
}

function asDataPlaneError(err: unknown, code = 'protocol'): DataPlaneError {
  if (err instanceof DataPlaneError) return err;
  return new DataPlaneError(code, err instanceof Error ? err.message : String(err));
}

class ClientSession implements DataPlaneSession {
  readonly identity: SessionIdentity;
  private readonly sessionId = newSessionId();
  private readonly tag: number;
  private readonly secret: Buffer;
  private readonly window: number;
  private readonly writeAhead: number;
  private readonly reconnectTimeout: number;
  private readonly handshakeTimeout: number;
  private readonly keepaliveMs: number;
  private readonly bucket: TokenBucket;

  private state: 'connecting' | 'ready' | 'down' | 'failed' | 'closed' = 'connecting';
  private conn: Conn | null = null;
  private everConnected = false;
  private fatal: DataPlaneError | null = null;
  private remoteError: DataPlaneError | null = null;
  private lastError: Error | null = null;

  private nextSeq = 1;
  /** Admitted, not yet acknowledged, in seq order; entries before writeIdx went out on the current connection. */
  private unacked: Entry[] = [];
  private writeIdx = 0;
  private inFlight = 0;
  /** Window bytes of the entries before writeIdx: written to the current connection, not acknowledged. */
  private onWire = 0;
  private urgentInFlight = 0;
  private waiters: Waiter[] = [];
  private urgentWaiters: Waiter[] = [];
  private flushWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private pushCallbacks: ((msg: Message) => void)[] = [];

  private downSince: number | null = null;
  private backoff = FIRST_BACKOFF;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private pumpTimer: NodeJS.Timeout | null = null;
  private ackScheduled = false;

  private counters = { bytesSent: 0, bytesAcked: 0, messagesSent: 0, messagesAcked: 0, zeroMessages: 0, reconnects: 0 };

  constructor(private readonly opts: ConnectOptions) {
    parseAddress(opts.address);
    this.identity = checkIdentity(opts.identity);
    this.secret = checkSecret(opts.secret);
    this.tag = sessionTag(this.identity);
    this.window = opts.windowBytes ?? DEFAULT_WINDOW;
    if (!(this.window > 0)) throw new DataPlaneError('bad_config', `windowBytes must be positive, got ${this.window}`);
    this.writeAhead = opts.writeAheadBytes ?? this.window;
    if (!(this.writeAhead > 0)) throw new DataPlaneError('bad_config', `writeAheadBytes must be positive, got ${this.writeAhead}`);
    this.reconnectTimeout = opts.reconnectTimeoutMs ?? DEFAULT_RECONNECT_TIMEOUT;
    this.handshakeTimeout = opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT;
    this.keepaliveMs = opts.keepaliveMs ?? DEFAULT_KEEPALIVE;
    this.bucket = new TokenBucket(opts.bandwidthBytesPerSecond ?? null);
  }

  get stats(): DataPlaneStats {
    return { ...this.counters, inFlight: this.inFlight };
  }

  async start(): Promise<void> {
    try {
      await this.dial();
    } catch (err) {
      const e = asDataPlaneError(err);
      this.fail(e);
      throw e;
    }
  }

  send(msg: Message, opts: SendOptions = {}): Promise<void> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    if (this.remoteError) {
      // Surface an earlier handler error here too, so a streaming loop stops early.
      const err = this.remoteError;
      this.remoteError = null;
      return Promise.reject(err);
    }
    let entry: Entry;
    try {
      entry = this.makeEntry(FrameKind.MSG, msg, opts.urgent === true);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      (entry.urgent ? this.urgentWaiters : this.waiters).push({ entry, resolve, reject });
      this.admit();
    });
  }

  request(msg: Message): Promise<Message> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    let entry: Entry;
    try {
      entry = this.makeEntry(FrameKind.REQUEST, msg);
    } catch (err) {
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      entry.reply = { resolve, reject };
      this.waiters.push({ entry, resolve: () => {}, reject });
      this.admit();
    });
  }

  flush(): Promise<void> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    return new Promise((resolve, reject) => {
      this.flushWaiters.push({ resolve, reject });
      this.checkFlush();
    });
  }

  onPush(cb: (msg: Message) => void): void {
    this.pushCallbacks.push(cb);
  }

  setBandwidth(bytesPerSecond: number | null): void {
    this.bucket.setRate(bytesPerSecond);
    if (this.pumpTimer) {
      clearTimeout(this.pumpTimer);
      this.pumpTimer = null;
    }
    this.pump();
  }

  async close(): Promise<void> {
    if (this.state === 'closed') return;
    const wasFailed = this.state === 'failed';
    this.state = 'closed';
    this.clearTimers();
    if (!wasFailed) this.rejectAll(new DataPlaneError('closed', 'data-plane session closed'));
    const conn = this.conn;
    this.conn = null;
    if (!conn) return;
    if (conn.keepalive) clearInterval(conn.keepalive);
    const socket = conn.socket;
    if (socket.destroyed) return;
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    this.writeControl(conn, FrameKind.BYE, 0);
    socket.end();
    setTimeout(() => socket.destroy(), 1000).unref();
    await closed;
  }

  // ---- admission, writing and acknowledgement ----

  private refusal(): DataPlaneError | null {
    if (this.state === 'failed') return this.fatal;
    if (this.state === 'closed') return new DataPlaneError('closed', 'data-plane session closed');
    return null;
  }

  private makeEntry(kind: SendKind, msg: Message, urgent = false): Entry {
    return { ...prepareMessage(msg), kind, seq: 0, written: false, urgent };
  }

  /** Window accounting: the header counts too, so that a flood of empty messages is bounded as well. */
  private cost(e: Entry): number {
    return HEADER_BYTES + e.meta.length + e.dataLength;
  }

  /**
   * Moves waiting sends into the window, in call order, urgent ones first. A message larger than the
   * window goes alone. Urgent messages have a window of their own, a quarter of the window beyond it.
   */
  private admit(): void {
    let overtook = false;
    while (this.urgentWaiters.length > 0) {
      const w = this.urgentWaiters[0];
      const cost = this.cost(w.entry);
      if (this.urgentInFlight > 0 && this.urgentInFlight + cost > this.window / 4) break;
      this.urgentWaiters.shift();
      this.insertUrgent(w.entry);
      this.inFlight += cost;
      this.urgentInFlight += cost;
      overtook = true;
      w.resolve();
    }
    if (overtook && this.pumpTimer) {
      // The limiter's wait was for the message now behind the urgent one.
      clearTimeout(this.pumpTimer);
      this.pumpTimer = null;
    }
    while (this.waiters.length > 0) {
      const w = this.waiters[0];
      const cost = this.cost(w.entry);
      if (this.inFlight > 0 && this.inFlight + cost > this.window) break;
      this.waiters.shift();
      w.entry.seq = this.nextSeq++;
      this.unacked.push(w.entry);
      this.inFlight += cost;
      w.resolve();
    }
    this.pump();
  }

  /**
   * An urgent message goes before every message that has never been written (after the urgent ones
   * already there), taking the first of their sequence numbers: the wire stays in seq order, and
   * nothing the server may already hold is renumbered.
   */
  private insertUrgent(e: Entry): void {
    let pos = this.writeIdx;
    while (pos < this.unacked.length && (this.unacked[pos].written || this.unacked[pos].urgent)) pos++;
    e.seq = pos < this.unacked.length ? this.unacked[pos].seq : this.nextSeq;
    for (let i = pos; i < this.unacked.length; i++) this.unacked[i].seq++;
    this.nextSeq++;
    this.unacked.splice(pos, 0, e);
  }

  /**
   * Writes admitted messages. No 'drain' wait: the window already bounds what can sit in the socket's
   * buffer, and handing the socket many frames at once lets it batch them into large writes.
   */
  private pump(): void {
    const conn = this.conn;
    if (!conn || this.state !== 'ready' || this.pumpTimer) return;
    while (this.writeIdx < this.unacked.length) {
      const e = this.unacked[this.writeIdx];
      const cost = this.cost(e);
      if (this.onWire > 0 && this.onWire + cost > this.writeAhead) return; // an acknowledgement pumps again
      const parts = encodeFrame({ kind: e.kind, tag: this.tag, seq: e.seq, type: e.type, meta: e.meta, data: payloadOf(e), zero: e.zero });
      const wait = this.bucket.take(wireLength(parts), e.urgent);
      if (wait > 0) {
        this.pumpTimer = setTimeout(() => {
          this.pumpTimer = null;
          this.pump();
        }, wait);
        return;
      }
      writeParts(conn.socket, parts);
      conn.lastTx = performance.now();
      this.opts.observer?.sent?.(this.identity, e.type, e.data.length);
      this.writeIdx++;
      this.onWire += cost;
      this.counters.bytesSent += e.data.length;
      if (!e.written) {
        e.written = true;
        this.counters.messagesSent++;
        if (e.zero) this.counters.zeroMessages++;
      }
    }
  }

  private completed(e: Entry, wasOnWire: boolean): void {
    const cost = this.cost(e);
    this.inFlight -= cost;
    if (e.urgent) this.urgentInFlight -= cost;
    if (wasOnWire) this.onWire -= cost;
    this.counters.messagesAcked++;
    this.counters.bytesAcked += e.data.length;
  }

  /** The peer applied every message with seq <= n (requests complete only with their response). */
  private ackUpTo(n: number): void {
    let i = 0;
    let removedWritten = 0;
    let kept: Entry[] | null = null;
    for (; i < this.unacked.length && this.unacked[i].seq <= n; i++) {
      const e = this.unacked[i];
      if (e.kind === FrameKind.MSG) {
        this.completed(e, i < this.writeIdx);
        if (i < this.writeIdx) removedWritten++;
      } else {
        (kept ??= []).push(e);
      }
    }
    if (i === 0 || i === (kept?.length ?? 0)) return;
    this.unacked.splice(0, i, ...(kept ?? []));
    this.writeIdx -= removedWritten;
    this.progress();
  }

  private removeAt(idx: number): Entry {
    const [e] = this.unacked.splice(idx, 1);
    const onWire = idx < this.writeIdx;
    if (onWire) this.writeIdx--;
    this.completed(e, onWire);
    this.progress();
    return e;
  }

  private findSeq(seq: number): number {
    for (let i = 0; i < this.unacked.length; i++) {
      if (this.unacked[i].seq === seq) return i;
      if (this.unacked[i].seq > seq) break;
    }
    return -1;
  }

  private onResponse(seq: number, reply: Message | null, err: DataPlaneError | null): void {
    this.ackUpTo(seq - 1);
    const idx = this.findSeq(seq);
    if (idx < 0) return; // a duplicate (resent request answered twice)
    const e = this.removeAt(idx);
    if (e.kind === FrameKind.REQUEST) {
      this.scheduleClientAck();
      if (err) e.reply?.reject(err);
      else e.reply?.resolve(reply as Message);
    } else if (err) {
      this.remoteError ??= err;
    }
  }

  /** Called whenever acknowledgements make room or complete work. */
  private progress(): void {
    this.downSince = null;
    this.backoff = FIRST_BACKOFF;
    queueMicrotask(() => {
      this.admit();
      this.checkFlush();
    });
  }

  private checkFlush(): void {
    if (this.flushWaiters.length === 0 || this.waiters.length > 0 || this.urgentWaiters.length > 0 || this.unacked.length > 0) return;
    const waiting = this.flushWaiters;
    this.flushWaiters = [];
    const err = this.remoteError;
    this.remoteError = null;
    for (const w of waiting) {
      if (err) w.reject(err);
      else w.resolve();
    }
  }

  /** Highest seq through which everything is complete: the resume point we report in HELLO. */
  private completedThrough(): number {
    return (this.unacked.length > 0 ? this.unacked[0].seq : this.nextSeq) - 1;
  }

  /** Tells the server which responses it may forget (it keeps them for resent requests). */
  private scheduleClientAck(): void {
    if (this.ackScheduled) return;
    this.ackScheduled = true;
    setImmediate(() => {
      this.ackScheduled = false;
      if (this.conn && this.state === 'ready') this.writeControl(this.conn, FrameKind.ACK, this.completedThrough());
    });
  }

  private writeControl(conn: Conn, kind: FrameKind, seq: number, meta?: Record<string, unknown>): void {
    writeParts(conn.socket, encodeFrame({ kind, tag: this.tag, seq, meta: encodeMeta(meta) }));
    conn.lastTx = performance.now();
  }

  // ---- connection lifecycle ----

  private dial(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const { socket, ready } = dial(this.opts.address, this.opts.tls);
      const decoder = new FrameDecoder({ expectedTag: this.tag, maxMetaBytes: HANDSHAKE_META_LIMIT, maxDataBytes: 0 });
      const conn = new Conn(socket, decoder);
      const clientNonce = newNonce();
      let phase: 'hello' | 'auth' | 'ready' = 'hello';
      let settled = false;

      const abort = (err: DataPlaneError, goodbye = false): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.opts.observer?.error?.(err.code);
        if (goodbye) {
          socket.end();
          setTimeout(() => socket.destroy(), 1000).unref();
        } else {
          socket.destroy();
        }
        reject(err);
      };
      const timer = setTimeout(
        () => abort(new DataPlaneError('timeout', `handshake with ${this.opts.address} timed out after ${this.handshakeTimeout} ms`)),
        this.handshakeTimeout,
      );

      const handshakeFrame = (f: Frame): void => {
        const meta = decodeMeta(f.meta);
        if (f.kind === FrameKind.ERROR) throw parseError(meta);
        if (phase === 'hello' && f.kind === FrameKind.CHALLENGE) {
          const { serverNonce, proof } = parseChallenge(meta);
          const expected = computeProof(this.secret, 'ferry-server', clientNonce, serverNonce, this.sessionId, this.identity);
          if (!proofMatches(expected, proof)) {
            // Tell the server why we hang up, so that both sides log the refusal.
            this.writeControl(conn, FrameKind.ERROR, 0, { code: 'auth_failed', message: 'server proof rejected' });
            this.log('warn', 'data-plane server failed authentication (wrong secret on one side?)', { address: this.opts.address });
            throw new DataPlaneError('auth_failed', `the server at ${this.opts.address} could not prove the shared secret (wrong secret on one side?)`);
          }
          const clientProof = computeProof(this.secret, 'ferry-client', clientNonce, serverNonce, this.sessionId, this.identity);
          this.writeControl(conn, FrameKind.AUTH, 0, { proof: clientProof.toString('hex') });
          phase = 'auth';
        } else if (phase === 'auth' && f.kind === FrameKind.WELCOME) {
          const { resumeSeq } = parseWelcome(meta);
          decoder.setLimits(MAX_META_BYTES, MAX_DATA_BYTES);
          phase = 'ready';
          settled = true;
          clearTimeout(timer);
          this.adopt(conn, resumeSeq);
          resolve();
        } else {
          throw new DataPlaneError('protocol', `unexpected frame kind ${f.kind} during the handshake`);
        }
      };

      socket.once(ready, () => {
        tuneSocket(socket);
        this.writeControl(conn, FrameKind.HELLO, 0, {
          version: PROTOCOL_VERSION,
          identity: this.identity,
          clientNonce,
          sessionId: this.sessionId,
          lastAckedSeq: this.completedThrough(),
          windowBytes: this.window,
          keepaliveMs: this.keepaliveMs,
        });
      });
      socket.on('data', (chunk: Buffer) => {
        conn.lastRx = performance.now();
        let frames: Frame[];
        try {
          frames = decoder.push(chunk);
        } catch (err) {
          if (phase === 'ready') this.connectionLost(conn, asDataPlaneError(err));
          else abort(asDataPlaneError(err));
          return;
        }
        for (const f of frames) {
          if (phase === 'ready') {
            if (this.conn !== conn) return;
            this.onFrame(conn, f);
            continue;
          }
          try {
            handshakeFrame(f);
          } catch (err) {
            const e = asDataPlaneError(err);
            abort(e, e.code === 'auth_failed');
            return;
          }
        }
      });
      socket.on('error', (err) => {
        if (phase === 'ready') this.connectionLost(conn, err);
        else abort(new DataPlaneError('connect_failed', `cannot connect to ${this.opts.address}: ${err.message}`));
      });
      socket.on('close', () => {
        if (phase === 'ready') this.connectionLost(conn, new DataPlaneError('disconnected', 'connection closed by peer'));
        else abort(new DataPlaneError('connect_failed', `connection to ${this.opts.address} closed during the handshake`));
      });
    });
  }

  /** A connection finished its handshake: make it current and resend what the server has not applied. */
  private adopt(conn: Conn, resumeSeq: number): void {
    if (this.state === 'closed' || this.state === 'failed') {
      conn.socket.destroy();
      return;
    }
    if (resumeSeq >= this.nextSeq) {
      conn.socket.destroy();
      this.opts.observer?.error?.('protocol');
      this.fail(new DataPlaneError('protocol', `server claims to have applied seq ${resumeSeq}, but only ${this.nextSeq - 1} were sent`));
      return;
    }
    this.conn = conn;
    this.state = 'ready';
    if (this.everConnected) {
      this.counters.reconnects++;
      this.log('info', 'data-plane session resumed', { address: this.opts.address, resumeSeq, resending: this.unacked.length });
    }
    this.everConnected = true;
    this.writeIdx = 0; // everything unacknowledged goes out again, in order
    this.onWire = 0;
    this.ackUpTo(resumeSeq);
    if (this.unacked.length === 0) this.downSince = null;
    conn.keepalive = setInterval(() => this.keepalive(conn), this.keepaliveMs / 2);
    conn.keepalive.unref();
    this.pump();
  }

  private onFrame(conn: Conn, f: Frame): void {
    try {
      switch (f.kind) {
        case FrameKind.ACK:
          this.ackUpTo(f.seq);
          return;
        case FrameKind.RESPONSE:
          this.onResponse(f.seq, frameToMessage(f), null);
          return;
        case FrameKind.ERROR: {
          const err = parseError(decodeMeta(f.meta));
          if (f.seq > 0) {
            this.onResponse(f.seq, null, err);
          } else if (FATAL.has(err.code)) {
            this.opts.observer?.error?.(err.code);
            this.fail(err);
          } else {
            this.connectionLost(conn, err);
          }
          return;
        }
        case FrameKind.PUSH:
          this.deliverPush(frameToMessage(f));
          return;
        case FrameKind.PONG:
          return;
        default:
          throw new DataPlaneError('protocol', `unexpected frame kind ${f.kind} from the server`);
      }
    } catch (err) {
      this.connectionLost(conn, asDataPlaneError(err));
    }
  }

  private deliverPush(msg: Message): void {
    for (const cb of this.pushCallbacks) {
      try {
        cb(msg);
      } catch (err) {
        this.log('warn', 'data-plane push callback threw', { error: (err as Error).message });
      }
    }
  }

  private keepalive(conn: Conn): void {
    if (this.conn !== conn) return;
    const now = performance.now();
    const silent = now - conn.lastRx;
    if (silent > 3 * this.keepaliveMs) {
      this.connectionLost(conn, new DataPlaneError('timeout', `no data from ${this.opts.address} for ${Math.round(silent)} ms`));
    } else if (silent >= this.keepaliveMs || now - conn.lastTx >= this.keepaliveMs) {
      // Also when only we are quiet: the server drops connections it has not heard from for a while.
      this.writeControl(conn, FrameKind.PING, 0);
    }
  }

  private connectionLost(conn: Conn, err: Error): void {
    if (conn.keepalive) clearInterval(conn.keepalive);
    conn.socket.destroy();
    if (this.conn !== conn) return;
    this.conn = null;
    this.opts.observer?.error?.(err instanceof DataPlaneError ? err.code : 'connection');
    if (this.pumpTimer) {
      clearTimeout(this.pumpTimer);
      this.pumpTimer = null;
    }
    if (this.state === 'closed' || this.state === 'failed') return;
    this.state = 'down';
    this.lastError = err;
    this.downSince ??= performance.now();
    this.log('warn', 'data-plane connection lost, resuming', { address: this.opts.address, error: err.message, unacked: this.unacked.length });
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    const left = this.reconnectTimeout - (performance.now() - (this.downSince ?? performance.now()));
    if (left <= 0) {
      this.fail(
        new DataPlaneError(
          'disconnected',
          `lost the connection to ${this.opts.address} and could not resume within ${this.reconnectTimeout} ms` +
            (this.lastError ? ` (last error: ${this.lastError.message})` : ''),
        ),
      );
      return;
    }
    this.reconnectTimer = setTimeout(
      () => {
        this.reconnectTimer = null;
        if (this.state !== 'down') return;
        this.dial().then(
          () => undefined,
          (e: unknown) => {
            const err = asDataPlaneError(e);
            if (this.state !== 'down') return;
            if (FATAL.has(err.code)) {
              this.fail(err);
              return;
            }
            this.lastError = err;
            this.opts.onReconnectError?.(err);
            this.backoff = Math.min(this.backoff * 2, MAX_BACKOFF);
            this.scheduleReconnect();
          },
        );
      },
      Math.min(this.backoff, left),
    );
  }

  private fail(err: DataPlaneError): void {
    if (this.state === 'failed' || this.state === 'closed') return;
    this.state = 'failed';
    this.fatal = err;
    this.clearTimers();
    if (this.conn) {
      if (this.conn.keepalive) clearInterval(this.conn.keepalive);
      this.conn.socket.destroy();
      this.conn = null;
    }
    this.log('error', 'data-plane session failed', { address: this.opts.address, code: err.code, error: err.message });
    this.rejectAll(err);
  }

  private rejectAll(err: DataPlaneError): void {
    const waiters = [...this.urgentWaiters, ...this.waiters];
    const unacked = this.unacked;
    const flushWaiters = this.flushWaiters;
    this.waiters = [];
    this.urgentWaiters = [];
    this.unacked = [];
    this.flushWaiters = [];
    this.writeIdx = 0;
    this.inFlight = 0;
    this.onWire = 0;
    this.urgentInFlight = 0;
    for (const w of waiters) w.reject(err);
    for (const e of unacked) e.reply?.reject(err);
    for (const f of flushWaiters) f.reject(err);
  }

  private clearTimers(): void {
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.pumpTimer) clearTimeout(this.pumpTimer);
    this.reconnectTimer = null;
    this.pumpTimer = null;
  }

  private log(level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void {
    this.opts.log?.(level, msg, { ...fields, migrationId: this.identity.migrationId, epoch: this.identity.epoch, stream: this.identity.stream });
  }
}
