// Server side of the data plane (the receiving host): authenticates clients, applies their messages
// strictly in order through the session handler, acknowledges after apply, and keeps per-session
// state so that a client that reconnects resumes without anything being applied twice.
import * as net from 'node:net';
import * as tls from 'node:tls';
import {
  DataPlaneError,
  DataPlaneRefused,
  type DataPlaneServer,
  type Message,
  type ServerOptions,
  type ServerSession,
  type SessionHandler,
  type SessionIdentity,
} from './api';
import { checkSecret, computeProof, newNonce, parseHello, proofMatches, sameIdentity, sessionTag, type Hello } from './auth';
import { decodeMeta, encodeFrame, encodeMeta, Flags, FrameDecoder, FrameKind, HEADER_BYTES, MAX_DATA_BYTES, MAX_META_BYTES, PROTOCOL_VERSION, type Frame } from './frame';
import { frameToMessage, payloadOf, prepareMessage, type PreparedMessage } from './message';
import { tuneSocket, writeParts } from './transport';

const DEFAULT_HANDSHAKE_TIMEOUT = 10_000;
const DEFAULT_SESSION_IDLE = 10 * 60_000;
const DEFAULT_CLIENT_KEEPALIVE = 5_000;
/** A connection that has been silent for this many client keepalive intervals is dropped (half-open). */
const SILENT_INTERVALS = 4;
const MIN_SILENCE_MS = 2_000;
const HANDSHAKE_META_LIMIT = 4096;
/** Acknowledge at least every this many applied bytes (or a quarter of the client's window)... */
const MAX_ACK_EVERY = 1024 * 1024;
/** ...and at the latest this long after an apply, so that small or final messages are not held back. */
const ACK_DELAY_MS = 1;
/** Responses kept for resent requests; the client's ACK frames normally prune them long before this. */
const MAX_CACHED_RESPONSES = 1024;

interface Result {
  reply: PreparedMessage | null;
  error: string | null;
}

type Work = { kind: typeof FrameKind.MSG | typeof FrameKind.REQUEST; seq: number; msg: Message } | { kind: typeof FrameKind.BYE };

class ServerConn {
  phase: 'hello' | 'auth' | 'accepting' | 'ready' | 'dead' = 'hello';
  hello: Hello | null = null;
  serverNonce = '';
  tag = 0;
  session: SessionState | null = null;
  lastRx = Date.now();
  silenceCheck: NodeJS.Timeout | null = null;
  constructor(
    readonly socket: net.Socket,
    readonly remote: string,
    readonly decoder: FrameDecoder,
  ) {}
}

class SessionState {
  conn: ServerConn | null = null;
  queue: Work[] = [];
  running = false;
  closed = false;
  idleTimer: NodeJS.Timeout | null = null;
  pendingAck = 0;
  ackSent = 0;
  unackedBytes = 0;
  ackEvery = MAX_ACK_EVERY;
  ackTimer: NodeJS.Timeout | null = null;
  pushSeq = 0;
  readonly responses = new Map<number, Result>();
  /** What the handler sees; remoteAddress follows the current connection. */
  readonly view: { -readonly [K in keyof ServerSession]: ServerSession[K] };

  constructor(
    readonly id: string,
    readonly identity: SessionIdentity,
    readonly handler: SessionHandler,
    remote: string,
    public lastApplied: number,
    push: (s: SessionState, msg: Message) => void,
  ) {
    this.view = { identity, sessionId: id, remoteAddress: remote, push: (msg: Message) => push(this, msg) };
  }

  pruneResponses(upTo: number): void {
    for (const seq of this.responses.keys()) if (seq <= upTo) this.responses.delete(seq);
  }
}

export async function listen(opts: ServerOptions): Promise<DataPlaneServer> {
  const server = new Server(opts);
  return server.start();
}

function isDead(conn: ServerConn): boolean {
  return conn.phase === 'dead';
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

class Server {
  private readonly secret: Buffer;
  private readonly handshakeTimeout: number;
  private readonly sessionIdle: number;
  private readonly sessionsById = new Map<string, SessionState>();
  private readonly sockets = new Set<net.Socket>();
  private readonly net: net.Server;
  private closed = false;

  constructor(private readonly opts: ServerOptions) {
    this.secret = checkSecret(opts.secret);
    this.handshakeTimeout = opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT;
    this.sessionIdle = opts.sessionIdleMs ?? DEFAULT_SESSION_IDLE;
    if (opts.tls) {
      if (!opts.tls.cert || !opts.tls.key) throw new DataPlaneError('bad_config', 'data-plane TLS needs a certificate and a key');
      const server = tls.createServer({ cert: opts.tls.cert, key: opts.tls.key, ca: opts.tls.ca });
      server.on('secureConnection', (socket) => this.onSocket(socket));
      server.on('tlsClientError', (err, socket) => this.log('warn', 'data-plane TLS handshake failed', { remote: socket.remoteAddress, error: err.message }));
      this.net = server;
    } else {
      this.net = net.createServer((socket) => this.onSocket(socket));
    }
  }

  async start(): Promise<DataPlaneServer> {
    await new Promise<void>((resolve, reject) => {
      this.net.once('error', reject);
      this.net.listen(this.opts.port, this.opts.host, () => {
        this.net.off('error', reject);
        resolve();
      });
    });
    this.net.on('error', (err) => this.log('error', 'data-plane listener error', { error: err.message }));
    const addr = this.net.address() as net.AddressInfo;
    this.log('info', 'data-plane listening', { address: addr.address, port: addr.port, tls: !!this.opts.tls });
    return {
      address: addr.address,
      port: addr.port,
      close: () => this.close(),
      sessions: () => this.sessionsById.size,
    };
  }

  private async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const done = new Promise<void>((resolve) => this.net.close(() => resolve()));
    for (const socket of this.sockets) socket.destroy();
    for (const s of [...this.sessionsById.values()]) this.endSession(s, 'server closed');
    await done;
  }

  // ---- connections and the handshake ----

  private onSocket(socket: net.Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    tuneSocket(socket);
    const remote = `${socket.remoteAddress}:${socket.remotePort}`;
    const conn = new ServerConn(socket, remote, new FrameDecoder({ maxMetaBytes: HANDSHAKE_META_LIMIT, maxDataBytes: 0 }));
    this.sockets.add(socket);
    const timer = setTimeout(() => {
      if (conn.phase === 'ready' || conn.phase === 'dead') return;
      this.log('warn', 'data-plane handshake timed out', { remote });
      this.opts.observer?.error?.('timeout');
      this.kill(conn, 'timeout', 'handshake timed out');
    }, this.handshakeTimeout);
    timer.unref();
    socket.on('data', (chunk: Buffer) => {
      conn.lastRx = Date.now();
      this.onData(conn, chunk);
    });
    socket.on('error', (err) => {
      this.opts.observer?.error?.('connection');
      this.log('info', 'data-plane connection error', { remote, error: err.message });
    });
    socket.on('close', () => {
      clearTimeout(timer);
      if (conn.silenceCheck) clearInterval(conn.silenceCheck);
      this.sockets.delete(socket);
      conn.phase = 'dead';
      const s = conn.session;
      if (s && s.conn === conn) {
        s.conn = null;
        this.startIdle(s);
      }
    });
  }

  private onData(conn: ServerConn, chunk: Buffer): void {
    if (conn.phase === 'dead') return;
    let frames: Frame[];
    try {
      frames = conn.decoder.push(chunk);
    } catch (err) {
      const e = err instanceof DataPlaneError ? err : new DataPlaneError('protocol', errorMessage(err));
      const established = conn.phase === 'ready';
      this.opts.observer?.error?.(e.code);
      // Nothing of a bad frame is applied; the client reconnects and resends from the last ack.
      this.log('warn', established ? 'corrupt data-plane frame refused' : 'bad data-plane frame before authentication', {
        ...this.fields(conn),
        code: e.code,
        error: e.message,
      });
      this.kill(conn, established ? 'corrupt_frame' : e.code, e.message);
      return;
    }
    for (const f of frames) {
      if (isDead(conn)) return;
      try {
        this.onFrame(conn, f);
      } catch (err) {
        const e = err instanceof DataPlaneError ? err : new DataPlaneError('protocol', errorMessage(err));
        this.log('warn', 'data-plane protocol error', { ...this.fields(conn), code: e.code, error: e.message });
        this.opts.observer?.error?.(e.code);
        this.kill(conn, e.code, e.message);
      }
    }
  }

  private onFrame(conn: ServerConn, f: Frame): void {
    switch (conn.phase) {
      case 'hello':
        return this.onHello(conn, f);
      case 'auth':
        return this.onAuth(conn, f);
      case 'ready':
        return this.onSessionFrame(conn, f);
      default:
        throw new DataPlaneError('protocol', `unexpected frame kind ${f.kind} before WELCOME`);
    }
  }

  private onHello(conn: ServerConn, f: Frame): void {
    if (f.kind !== FrameKind.HELLO) throw new DataPlaneError('protocol', `expected HELLO, got frame kind ${f.kind}`);
    const hello = parseHello(decodeMeta(f.meta));
    if (hello.version !== PROTOCOL_VERSION) {
      throw new DataPlaneError('bad_version', `unsupported protocol version ${hello.version} (this side speaks ${PROTOCOL_VERSION})`);
    }
    conn.hello = hello;
    const tag = sessionTag(hello.identity);
    if (f.tag !== tag) throw new DataPlaneError('bad_tag', 'HELLO tag does not match its identity');
    conn.tag = tag;
    conn.decoder.setExpectedTag(tag);
    conn.serverNonce = newNonce();
    const proof = computeProof(this.secret, 'ferry-server', hello.clientNonce, conn.serverNonce, hello.sessionId, hello.identity);
    this.write(conn, FrameKind.CHALLENGE, 0, { meta: { serverNonce: conn.serverNonce, proof: proof.toString('hex') } });
    conn.phase = 'auth';
  }

  private onAuth(conn: ServerConn, f: Frame): void {
    const hello = conn.hello as Hello;
    if (f.kind === FrameKind.ERROR) {
      const meta = decodeMeta(f.meta);
      this.log('warn', 'data-plane client rejected our proof (wrong secret on one side?)', { ...this.fields(conn), code: meta.code });
      this.opts.observer?.error?.('auth_failed');
      this.kill(conn, null, '');
      return;
    }
    if (f.kind !== FrameKind.AUTH) throw new DataPlaneError('protocol', `expected AUTH, got frame kind ${f.kind}`);
    const expected = computeProof(this.secret, 'ferry-client', hello.clientNonce, conn.serverNonce, hello.sessionId, hello.identity);
    if (!proofMatches(expected, decodeMeta(f.meta).proof)) {
      this.log('warn', 'data-plane authentication failed (wrong secret?)', this.fields(conn));
      this.opts.observer?.error?.('auth_failed');
      this.kill(conn, 'auth_failed', 'authentication failed');
      return;
    }
    conn.phase = 'accepting';
    void this.establish(conn, hello);
  }

  /** After authentication: find or create the session (asking the application), then WELCOME. */
  private async establish(conn: ServerConn, hello: Hello): Promise<void> {
    const id = hello.identity;
    let s = this.sessionsById.get(hello.sessionId);
    try {
      if (!s) {
        const handler = await this.opts.accept(id, conn.remote);
        if (this.closed) {
          this.kill(conn, 'refused', 'server is shutting down');
          return;
        }
        // A reconnect of the same session may have raced this one through accept().
        s = this.sessionsById.get(hello.sessionId);
        if (!s) {
          s = new SessionState(hello.sessionId, id, handler, conn.remote, hello.lastAckedSeq, (ss, msg) => this.push(ss, msg));
          this.sessionsById.set(s.id, s);
          this.log('info', 'data-plane session accepted', this.fields(conn));
        }
      }
      if (!sameIdentity(s.identity, id)) throw new DataPlaneRefused('session id is in use by another identity');
    } catch (err) {
      const reason = errorMessage(err);
      this.log(err instanceof DataPlaneError ? 'warn' : 'error', 'data-plane session refused', { ...this.fields(conn), reason });
      this.opts.observer?.error?.('refused');
      this.kill(conn, 'refused', reason);
      return;
    }
    if (isDead(conn)) {
      if (!s.conn) this.startIdle(s);
      return;
    }
    if (s.conn && s.conn !== conn) {
      s.conn.phase = 'dead';
      s.conn.socket.destroy();
    }
    if (s.idleTimer) clearTimeout(s.idleTimer);
    s.idleTimer = null;
    s.pruneResponses(hello.lastAckedSeq);
    s.ackEvery = Math.max(1, Math.min(MAX_ACK_EVERY, Math.floor((hello.windowBytes ?? Infinity) / 4)));
    s.view.remoteAddress = conn.remote;
    conn.session = s;
    conn.phase = 'ready';
    conn.decoder.setLimits(MAX_META_BYTES, MAX_DATA_BYTES);
    this.write(conn, FrameKind.WELCOME, 0, { meta: { resumeSeq: s.lastApplied } });
    s.conn = conn; // only now: ACKs and responses must not overtake the WELCOME
    this.watchSilence(conn, hello);
    if (s.lastApplied > hello.lastAckedSeq) this.log('info', 'data-plane session resumed', { ...this.fields(conn), resumeSeq: s.lastApplied });
  }

  /** Drops a connection whose client went silent (its host died: a half-open connection); the session stays. */
  private watchSilence(conn: ServerConn, hello: Hello): void {
    const silence = Math.max(MIN_SILENCE_MS, SILENT_INTERVALS * (hello.keepaliveMs ?? DEFAULT_CLIENT_KEEPALIVE));
    conn.silenceCheck = setInterval(() => {
      const silent = Date.now() - conn.lastRx;
      if (silent <= silence) return;
      this.log('warn', 'data-plane client went silent; dropping the connection', { ...this.fields(conn), silentMs: silent });
      this.opts.observer?.error?.('timeout');
      conn.phase = 'dead';
      conn.socket.destroy();
    }, silence / 2);
    conn.silenceCheck.unref();
  }

  // ---- an established session ----

  private onSessionFrame(conn: ServerConn, f: Frame): void {
    const s = conn.session as SessionState;
    switch (f.kind) {
      case FrameKind.MSG:
      case FrameKind.REQUEST:
        this.opts.observer?.received?.(s.identity, f.type, f.flags & Flags.ZERO ? 0 : f.data.length);
        s.queue.push({ kind: f.kind, seq: f.seq, msg: frameToMessage(f) });
        void this.drain(s);
        return;
      case FrameKind.ACK:
        s.pruneResponses(f.seq);
        return;
      case FrameKind.PING:
        this.write(conn, FrameKind.PONG, f.seq);
        return;
      case FrameKind.BYE:
        s.queue.push({ kind: FrameKind.BYE });
        void this.drain(s);
        return;
      case FrameKind.ERROR:
        this.log('warn', 'data-plane client reported an error', { ...this.fields(conn), ...decodeMeta(f.meta) });
        this.kill(conn, null, '');
        return;
      default:
        throw new DataPlaneError('protocol', `unexpected frame kind ${f.kind} from the client`);
    }
  }

  /** Applies queued messages one at a time, in seq order, across reconnects. */
  private async drain(s: SessionState): Promise<void> {
    if (s.running) return;
    s.running = true;
    try {
      while (s.queue.length > 0 && !s.closed) {
        const w = s.queue.shift() as Work;
        if (w.kind === FrameKind.BYE) {
          this.endSession(s, 'closed by the client');
          return;
        }
        await this.apply(s, w);
      }
    } finally {
      s.running = false;
    }
  }

  private async apply(s: SessionState, w: Exclude<Work, { kind: typeof FrameKind.BYE }>): Promise<void> {
    if (w.seq <= s.lastApplied) {
      // A resend of something already applied: never apply twice, but answer again.
      if (w.kind === FrameKind.MSG) return this.queueAck(s, w.seq, 0);
      const cached = s.responses.get(w.seq);
      if (cached) return this.sendResult(s, w.seq, cached);
      this.log('warn', 'response of a resent request was forgotten; running the request again', { seq: w.seq, sessionId: s.id });
    } else if (w.seq !== s.lastApplied + 1) {
      this.log('error', 'data-plane sequence gap', { sessionId: s.id, expected: s.lastApplied + 1, got: w.seq });
      this.opts.observer?.error?.('protocol');
      s.queue = [];
      if (s.conn) this.kill(s.conn, 'protocol', `sequence gap: expected ${s.lastApplied + 1}, got ${w.seq}`);
      return;
    }
    const result: Result = { reply: null, error: null };
    try {
      const reply = await s.handler.onMessage(s.view, w.msg);
      if (w.kind === FrameKind.REQUEST) result.reply = prepareMessage(reply ?? { type: 0, meta: {}, data: Buffer.alloc(0) }, 0);
    } catch (err) {
      result.error = errorMessage(err);
    }
    if (w.seq > s.lastApplied) s.lastApplied = w.seq;
    if (w.kind === FrameKind.MSG && result.error === null) return this.queueAck(s, w.seq, HEADER_BYTES + w.msg.data.length);
    if (w.kind === FrameKind.REQUEST) {
      s.responses.set(w.seq, result);
      if (s.responses.size > MAX_CACHED_RESPONSES) s.responses.delete(s.responses.keys().next().value as number);
    }
    this.sendResult(s, w.seq, result);
  }

  private sendResult(s: SessionState, seq: number, r: Result): void {
    this.flushAck(s);
    if (!s.conn) return; // the client resends the request after reconnecting; the cache answers it
    if (r.error !== null) this.write(s.conn, FrameKind.ERROR, seq, { meta: { code: 'remote', message: r.error } });
    else if (r.reply) this.write(s.conn, FrameKind.RESPONSE, seq, { msg: r.reply });
  }

  /** ACKs are cumulative: one frame per ackEvery bytes (or after ACK_DELAY_MS) acknowledges a whole burst. */
  private queueAck(s: SessionState, seq: number, bytes: number): void {
    s.pendingAck = Math.max(s.pendingAck, seq);
    s.unackedBytes += bytes;
    if (s.unackedBytes >= s.ackEvery) this.flushAck(s);
    else s.ackTimer ??= setTimeout(() => this.flushAck(s), ACK_DELAY_MS);
  }

  private flushAck(s: SessionState): void {
    if (s.ackTimer) clearTimeout(s.ackTimer);
    s.ackTimer = null;
    if (!s.conn || s.pendingAck <= s.ackSent) return;
    this.write(s.conn, FrameKind.ACK, s.pendingAck);
    s.ackSent = s.pendingAck;
    s.unackedBytes = 0;
  }

  private push(s: SessionState, msg: Message): void {
    const p = prepareMessage(msg);
    if (!s.conn || s.closed) return;
    this.write(s.conn, FrameKind.PUSH, ++s.pushSeq, { msg: p });
  }

  private startIdle(s: SessionState): void {
    if (s.closed) return;
    if (s.idleTimer) clearTimeout(s.idleTimer);
    s.idleTimer = setTimeout(() => this.endSession(s, 'idle'), this.sessionIdle);
    s.idleTimer.unref();
  }

  private endSession(s: SessionState, reason: string): void {
    if (s.closed) return;
    s.closed = true;
    s.queue = [];
    this.sessionsById.delete(s.id);
    if (s.idleTimer) clearTimeout(s.idleTimer);
    if (s.ackTimer) clearTimeout(s.ackTimer);
    if (s.conn) this.kill(s.conn, null, '');
    s.conn = null;
    this.log('info', 'data-plane session ended', { sessionId: s.id, reason, migrationId: s.identity.migrationId, vmId: s.identity.vmId, stream: s.identity.stream });
    try {
      s.handler.onClose?.(s.view);
    } catch (err) {
      this.log('error', 'data-plane session onClose threw', { sessionId: s.id, error: errorMessage(err) });
    }
  }

  // ---- output ----

  private write(conn: ServerConn, kind: FrameKind, seq: number, body: { meta?: Record<string, unknown>; msg?: PreparedMessage } = {}): void {
    const m = body.msg;
    const parts = m
      ? encodeFrame({ kind, tag: conn.tag, seq, type: m.type, meta: m.meta, data: payloadOf(m), zero: m.zero })
      : encodeFrame({ kind, tag: conn.tag, seq, meta: encodeMeta(body.meta) });
    writeParts(conn.socket, parts);
  }

  /** Ends a connection, first telling the peer why (code null: no ERROR frame). Nothing more is read from it. */
  private kill(conn: ServerConn, code: string | null, message: string): void {
    if (conn.phase === 'dead') return;
    conn.phase = 'dead';
    if (code !== null) this.write(conn, FrameKind.ERROR, 0, { meta: { code, message } });
    conn.socket.end();
    setTimeout(() => conn.socket.destroy(), 2000).unref();
  }

  private fields(conn: ServerConn): Record<string, unknown> {
    const id = conn.hello?.identity;
    return id ? { remote: conn.remote, migrationId: id.migrationId, epoch: id.epoch, vmId: id.vmId, stream: id.stream } : { remote: conn.remote };
  }

  private log(level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void {
    this.opts.log?.(level, msg, fields);
  }
}
