// The data plane over real TCP on 127.0.0.1, with a fault-injecting proxy between the two ends.
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  connect,
  DataPlaneError,
  errorReason,
  DataPlaneRefused,
  listen,
  sessionTag,
  type ConnectOptions,
  type DataPlaneObserver,
  type DataPlaneServer,
  type DataPlaneSession,
  type Message,
  type ServerOptions,
  type SessionHandler,
  type SessionIdentity,
} from '../../dataplane';
import { FrameKind, PROTOCOL_VERSION } from '../../dataplane/frame';
import { RawPeer } from '../support/dataplane-peer';

const BLOCK = 64 * 1024;
const SECRET = randomBytes(32);
const IDENTITY: SessionIdentity = { migrationId: 'mig-1', epoch: 3, vmId: 'vm-1', stream: 'disk' };
const MSG_BLOCK = 1;

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-dp-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface LogLine {
  level: string;
  msg: string;
  fields?: Record<string, unknown>;
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** A disk image of random blocks with every 7th block all zero. */
function sourceImage(blocks: number): Buffer {
  const img = randomBytes(blocks * BLOCK);
  for (let i = 0; i < blocks; i += 7) img.fill(0, i * BLOCK, (i + 1) * BLOCK);
  return img;
}

/** The receiving side: writes blocks into a file at meta.offset, and checks each one against the source. */
class FileTarget {
  readonly file: string;
  readonly fd: number;
  applied = 0;
  mismatches = 0;
  appliedOffsets = new Map<number, number>();
  constructor(
    name: string,
    readonly source: Buffer,
  ) {
    this.file = path.join(dir, name);
    this.fd = fs.openSync(this.file, 'w+');
    cleanups.push(() => fs.closeSync(this.fd));
  }
}

async function writeAt(fd: number, data: Buffer, offset: number): Promise<void> {
  await new Promise<void>((resolve, reject) => fs.write(fd, data, 0, data.length, offset, (err) => (err ? reject(err) : resolve())));
}

function fileTarget(name: string, source: Buffer): { target: FileTarget; handler: SessionHandler } {
  const target = new FileTarget(name, source);
  const handler: SessionHandler = {
    onMessage: async (_s, msg) => {
      const offset = msg.meta.offset as number;
      if (!msg.data.equals(source.subarray(offset, offset + msg.data.length))) target.mismatches++;
      await writeAt(target.fd, msg.data, offset);
      target.applied++;
      target.appliedOffsets.set(offset, (target.appliedOffsets.get(offset) ?? 0) + 1);
    },
  };
  return { target, handler };
}

function targetHash(t: FileTarget, length: number): string {
  const buf = Buffer.alloc(length);
  fs.readSync(t.fd, buf, 0, length, 0);
  return sha256(buf);
}

async function startServer(opts: Partial<ServerOptions> & Pick<ServerOptions, 'accept'>, logs: LogLine[] = []): Promise<DataPlaneServer> {
  const server = await listen({
    host: '127.0.0.1',
    port: 0,
    secret: SECRET,
    log: (level, msg, fields) => logs.push({ level, msg, fields }),
    ...opts,
  });
  cleanups.push(() => server.close());
  return server;
}

async function startClient(port: number, opts: Partial<ConnectOptions> = {}): Promise<DataPlaneSession> {
  const session = await connect({ address: `127.0.0.1:${port}`, secret: SECRET, identity: IDENTITY, ...opts });
  cleanups.push(() => session.close());
  return session;
}

async function sendImage(session: DataPlaneSession, image: Buffer): Promise<void> {
  for (let off = 0; off < image.length; off += BLOCK) {
    await session.send({ type: MSG_BLOCK, meta: { offset: off }, data: image.subarray(off, off + BLOCK) });
  }
  await session.flush();
}

/** A TCP proxy that can flip one byte of the client-to-server stream or cut every connection. */
class FaultProxy {
  port = 0;
  bytesUp = 0;
  connections = 0;
  flipAt: number | null = null;
  /** Offset in the server-to-client stream of a byte to flip. */
  flipDownAt: number | null = null;
  bytesDown = 0;
  cutAt: number | null = null;
  private readonly sockets = new Set<net.Socket>();
  /** Connections that silently stop forwarding in both directions (a half-open link). */
  private readonly silenced = new Set<net.Socket>();
  private server: net.Server | null = null;

  constructor(private readonly targetPort: number) {}

  async start(): Promise<void> {
    this.server = net.createServer((down) => {
      this.connections++;
      const up = net.connect(this.targetPort, '127.0.0.1');
      for (const s of [down, up]) {
        this.sockets.add(s);
        s.on('error', () => undefined);
        s.on('close', () => {
          this.sockets.delete(s);
          down.destroy();
          up.destroy();
        });
      }
      down.on('data', (chunk: Buffer) => {
        if (this.silenced.has(down)) return;
        const start = this.bytesUp;
        this.bytesUp += chunk.length;
        if (this.flipAt !== null && this.flipAt >= start && this.flipAt < this.bytesUp) {
          chunk = Buffer.from(chunk);
          chunk[this.flipAt - start] ^= 0x20;
          this.flipAt = null;
        }
        if (!up.write(chunk)) {
          down.pause();
          up.once('drain', () => down.resume());
        }
        if (this.cutAt !== null && this.bytesUp >= this.cutAt) {
          this.cutAt = null;
          this.cut();
        }
      });
      up.on('data', (chunk: Buffer) => {
        if (this.silenced.has(down)) return;
        const start = this.bytesDown;
        this.bytesDown += chunk.length;
        if (this.flipDownAt !== null && this.flipDownAt >= start && this.flipDownAt < this.bytesDown) {
          chunk = Buffer.from(chunk);
          chunk[this.flipDownAt - start] ^= 0x01;
          this.flipDownAt = null;
        }
        if (!down.write(chunk)) {
          up.pause();
          down.once('drain', () => up.resume());
        }
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as net.AddressInfo).port;
    cleanups.push(() => this.stop());
  }

  /** Stop forwarding on every current connection, without closing anything. */
  silence(): void {
    for (const s of this.sockets) this.silenced.add(s);
  }

  cut(): void {
    for (const s of this.sockets) s.destroy();
  }

  async stop(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()));
  }
}

async function expectCode(p: Promise<unknown>, code: string): Promise<DataPlaneError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(DataPlaneError);
    expect((err as DataPlaneError).code).toBe(code);
    return err as DataPlaneError;
  }
  throw new Error(`expected a DataPlaneError ${code}`);
}

function noSecretIn(logs: LogLine[]): void {
  const text = JSON.stringify(logs);
  for (const form of [SECRET.toString('hex'), SECRET.toString('base64'), SECRET.toString('latin1')]) expect(text).not.toContain(form);
}

describe('data plane', () => {
  it('1) copies 2000 blocks of 64 KiB (random and zero) into a file with equal hashes', async () => {
    const image = sourceImage(2000);
    const { target, handler } = fileTarget('t1.img', image);
    const server = await startServer({ accept: async () => handler });
    const session = await startClient(server.port);
    await sendImage(session, image);
    expect(targetHash(target, image.length)).toBe(sha256(image));
    expect(target.mismatches).toBe(0);
    const zeros = Math.ceil(2000 / 7);
    expect(session.stats).toMatchObject({ messagesSent: 2000, messagesAcked: 2000, zeroMessages: zeros, inFlight: 0, reconnects: 0 });
    expect(session.stats.bytesSent).toBe((2000 - zeros) * BLOCK);
  });

  it('2) refuses a wrong secret on both sides and applies nothing', async () => {
    const logs: LogLine[] = [];
    let accepted = 0;
    let applied = 0;
    const server = await startServer(
      {
        accept: async () => {
          accepted++;
          return { onMessage: async () => void applied++ };
        },
      },
      logs,
    );

    // A client with another secret: it refuses the server's proof, and tells the server so.
    await expectCode(connect({ address: `127.0.0.1:${server.port}`, secret: randomBytes(32), identity: IDENTITY }), 'auth_failed');

    // A client that ignores the server's proof and answers with a forged one: the server refuses it.
    const rogue = new RawPeer(server.port);
    cleanups.push(() => rogue.destroy());
    rogue.send(FrameKind.HELLO, sessionTag(IDENTITY), 0, {
      version: PROTOCOL_VERSION,
      identity: IDENTITY,
      clientNonce: randomBytes(32).toString('hex'),
      sessionId: 'rogue-session-1',
      lastAckedSeq: 0,
    });
    await rogue.next(FrameKind.CHALLENGE);
    rogue.send(FrameKind.AUTH, sessionTag(IDENTITY), 0, { proof: randomBytes(32).toString('hex') });
    rogue.send(FrameKind.MSG, sessionTag(IDENTITY), 1, { offset: 0 }, randomBytes(100));
    const err = await rogue.next(FrameKind.ERROR);
    expect(err.meta.code).toBe('auth_failed');
    await rogue.waitClosed();

    await new Promise((r) => setTimeout(r, 100));
    expect(accepted).toBe(0);
    expect(applied).toBe(0);
    expect(server.sessions()).toBe(0);
    expect(logs.some((l) => l.level === 'warn' && /rejected our proof/.test(l.msg))).toBe(true);
    expect(logs.some((l) => l.level === 'warn' && /authentication failed/.test(l.msg))).toBe(true);
    noSecretIn(logs);
  });

  it('3) accept() refuses a foreign migration or an older epoch with the reason; a foreign tag is refused', async () => {
    const logs: LogLine[] = [];
    let applied = 0;
    const server = await startServer(
      {
        accept: async (id) => {
          if (id.migrationId !== IDENTITY.migrationId) throw new DataPlaneRefused(`unknown migration ${id.migrationId}`);
          if (id.epoch < IDENTITY.epoch) throw new DataPlaneRefused(`epoch ${id.epoch} is older than ${IDENTITY.epoch}`);
          return { onMessage: async () => void applied++ };
        },
      },
      logs,
    );
    const foreign = await expectCode(startClient(server.port, { identity: { ...IDENTITY, migrationId: 'mig-other' } }), 'refused');
    expect(foreign.message).toContain('unknown migration mig-other');
    const older = await expectCode(startClient(server.port, { identity: { ...IDENTITY, epoch: 2 } }), 'refused');
    expect(older.message).toContain('epoch 2 is older than 3');
    expect(server.sessions()).toBe(0);

    // An authenticated peer that sends a frame tagged for another migration: refused, nothing applied.
    const peer = new RawPeer(server.port);
    cleanups.push(() => peer.destroy());
    const tag = sessionTag(IDENTITY);
    const clientNonce = randomBytes(32).toString('hex');
    peer.send(FrameKind.HELLO, tag, 0, { version: PROTOCOL_VERSION, identity: IDENTITY, clientNonce, sessionId: 'raw-session-1', lastAckedSeq: 0 });
    const challenge = await peer.next(FrameKind.CHALLENGE);
    const { computeProof } = await import('../../dataplane/auth');
    const proof = computeProof(SECRET, 'ferry-client', clientNonce, challenge.meta.serverNonce as string, 'raw-session-1', IDENTITY);
    peer.send(FrameKind.AUTH, tag, 0, { proof: proof.toString('hex') });
    await peer.next(FrameKind.WELCOME);
    peer.send(FrameKind.MSG, sessionTag({ ...IDENTITY, migrationId: 'mig-other' }), 1, { offset: 0 }, randomBytes(100));
    const err = await peer.next(FrameKind.ERROR);
    expect(err.meta.code).toBe('corrupt_frame');
    expect(String(err.meta.message)).toContain('another session');
    await peer.waitClosed();
    expect(applied).toBe(0);
    expect(logs.some((l) => l.fields?.code === 'bad_tag')).toBe(true);
  });

  it('4) refuses a frame corrupted in flight, writes nothing corrupt, and heals by reconnecting', async () => {
    const logs: LogLine[] = [];
    const image = sourceImage(600);
    const { target, handler } = fileTarget('t4.img', image);
    const seen = { server: new Map<string, number>(), client: new Map<string, number>(), sent: 0, received: 0 };
    const observer = (side: 'server' | 'client'): DataPlaneObserver => ({
      error: (code) => seen[side].set(errorReason(code), (seen[side].get(errorReason(code)) ?? 0) + 1),
      sent: (_id, _type, bytes) => void (seen.sent += bytes),
      received: (_id, _type, bytes) => void (seen.received += bytes),
    });
    const server = await startServer({ accept: async () => handler, observer: observer('server') }, logs);
    const proxy = new FaultProxy(server.port);
    await proxy.start();
    proxy.flipAt = 10 * 1024 * 1024 + 12345;
    const session = await startClient(proxy.port, { observer: observer('client') });
    await sendImage(session, image);
    // Both sides count the corrupt frame; every byte went out (resends again) and what arrived was counted.
    expect(seen.server.get('crc')).toBe(1);
    expect(seen.client.get('crc')).toBe(1);
    let payload = 0; // all-zero blocks travel as a flag
    for (let off = 0; off < image.length; off += BLOCK) if (image.subarray(off, off + BLOCK).some((x) => x !== 0)) payload += BLOCK;
    expect(seen.sent).toBe(session.stats.bytesSent);
    expect(seen.sent).toBeGreaterThan(payload); // the resent frames count again
    expect(seen.received).toBeGreaterThanOrEqual(payload);
    expect(seen.received).toBeLessThanOrEqual(seen.sent);
    expect(proxy.flipAt).toBeNull(); // the byte was flipped
    expect(target.mismatches).toBe(0);
    expect(targetHash(target, image.length)).toBe(sha256(image));
    expect(session.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(logs.some((l) => l.msg === 'corrupt data-plane frame refused')).toBe(true);
    expect([...target.appliedOffsets.values()].every((n) => n === 1)).toBe(true);
  });

  it('4b) a corrupted acknowledgement from the server also heals by reconnecting', async () => {
    const logs: LogLine[] = [];
    const image = sourceImage(300);
    const { target, handler } = fileTarget('t4b.img', image);
    const server = await startServer({ accept: async () => handler });
    const proxy = new FaultProxy(server.port);
    await proxy.start();
    proxy.flipDownAt = 2000; // past the handshake, inside the stream of ACK frames
    const session = await startClient(proxy.port, { log: (level, msg, fields) => logs.push({ level, msg, fields }) });
    await sendImage(session, image);
    expect(proxy.flipDownAt).toBeNull();
    expect(session.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(logs.some((l) => /connection lost/.test(l.msg) && /checksum/.test(String(l.fields?.error)))).toBe(true);
    expect(targetHash(target, image.length)).toBe(sha256(image));
    expect([...target.appliedOffsets.values()].every((n) => n === 1)).toBe(true);
  });

  it('4c) keepalive: a slow handler keeps the connection; a silent (half-open) link is detected and resumed', async () => {
    const image = sourceImage(200);
    const { target, handler } = fileTarget('t4c.img', image);
    let slowOnce = true;
    const server = await startServer({
      accept: async () => ({
        onMessage: async (session, msg) => {
          if (slowOnce && msg.meta.offset === 10 * BLOCK) {
            slowOnce = false;
            await new Promise((r) => setTimeout(r, 800)); // 8 keepalive intervals
          }
          return handler.onMessage(session, msg);
        },
      }),
    });
    const proxy = new FaultProxy(server.port);
    await proxy.start();
    const session = await startClient(proxy.port, { keepaliveMs: 100 });
    await sendImage(session, image.subarray(0, 50 * BLOCK));
    expect(session.stats.reconnects).toBe(0);

    proxy.silence();
    for (let off = 50 * BLOCK; off < image.length; off += BLOCK) {
      await session.send({ type: MSG_BLOCK, meta: { offset: off }, data: image.subarray(off, off + BLOCK) });
    }
    await session.flush();
    expect(session.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(targetHash(target, image.length)).toBe(sha256(image));
    expect([...target.appliedOffsets.values()].every((n) => n === 1)).toBe(true);
  });

  it('5) resumes from the last acknowledged message after the connection is cut', async () => {
    const image = sourceImage(800);
    const { target, handler } = fileTarget('t5.img', image);
    const server = await startServer({ accept: async () => handler });
    const proxy = new FaultProxy(server.port);
    await proxy.start();
    proxy.cutAt = 20 * 1024 * 1024;
    const session = await startClient(proxy.port);
    await sendImage(session, image);
    expect(proxy.connections).toBeGreaterThanOrEqual(2);
    expect(session.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(targetHash(target, image.length)).toBe(sha256(image));
    // Applied exactly once each: the server skipped what it had already applied.
    expect(target.applied).toBe(800);
    expect(target.appliedOffsets.size).toBe(800);
    expect(session.stats.messagesAcked).toBe(800);
  });

  it('6) back-pressure: with a slow handler, in-flight bytes never exceed the window', async () => {
    const window = 256 * 1024;
    let applied = 0;
    const server = await startServer({
      accept: async () => ({
        onMessage: async () => {
          await new Promise((r) => setTimeout(r, 2));
          applied++;
        },
      }),
    });
    const session = await startClient(server.port, { windowBytes: window });
    let max = 0;
    const sample = setInterval(() => (max = Math.max(max, session.stats.inFlight)), 1);
    try {
      for (let i = 0; i < 150; i++) {
        await session.send({ type: MSG_BLOCK, meta: { i }, data: randomBytes(16 * 1024) });
        max = Math.max(max, session.stats.inFlight);
        expect(session.stats.inFlight).toBeLessThanOrEqual(window);
      }
      await session.flush();
    } finally {
      clearInterval(sample);
    }
    expect(applied).toBe(150);
    expect(max).toBeLessThanOrEqual(window);
    expect(max).toBeGreaterThan(window / 2); // the window was actually used
  });

  it('7) bandwidth limit: 4 MiB at 8 MiB/s takes about half a second; lifting it mid-way speeds up', async () => {
    const server = await startServer({ accept: async () => ({ onMessage: async () => undefined }) });
    const data = randomBytes(4 * 1024 * 1024);
    const limited = await startClient(server.port, { bandwidthBytesPerSecond: 8 * 1024 * 1024 });
    let t0 = performance.now();
    await sendImage(limited, data);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(350);

    const slow = await startClient(server.port, { bandwidthBytesPerSecond: 1024 * 1024 });
    t0 = performance.now();
    const done = sendImage(slow, data);
    await new Promise((r) => setTimeout(r, 300));
    slow.setBandwidth(null);
    await done;
    expect(performance.now() - t0).toBeLessThan(3000); // at 1 MiB/s it would take about 4 s
  });

  it('8) request/response, push, and handler errors coming back as remote errors', async () => {
    let closed = 0;
    const server = await startServer({
      accept: async () => ({
        onClose: () => void closed++,
        onMessage: async (session, msg): Promise<Message | void> => {
          if (msg.type === 2) return { type: 3, meta: { echo: msg.meta.q }, data: Buffer.concat([msg.data, msg.data]) };
          if (msg.type === 4) return { type: 4, meta: {}, data: Buffer.alloc(8192) };
          if (msg.type === 5) session.push({ type: 6, meta: { fetch: msg.meta.block }, data: Buffer.from('please') });
          if (msg.type === 9) throw new Error(`cannot apply ${msg.meta.what}`);
        },
      }),
    });
    const session = await startClient(server.port);
    const reply = await session.request({ type: 2, meta: { q: 'hi' }, data: Buffer.from('ab') });
    expect(reply).toMatchObject({ type: 3, meta: { echo: 'hi' } });
    expect(reply.data.toString()).toBe('abab');
    const zero = await session.request({ type: 4, meta: {}, data: Buffer.alloc(0) });
    expect(zero.zero).toBe(true);
    expect(zero.data.equals(Buffer.alloc(8192))).toBe(true);

    const pushed = new Promise<Message>((resolve) => session.onPush(resolve));
    await session.send({ type: 5, meta: { block: 42 }, data: Buffer.alloc(0) });
    const push = await pushed;
    expect(push).toMatchObject({ type: 6, meta: { fetch: 42 } });
    expect(push.data.toString()).toBe('please');

    const reqErr = await expectCode(session.request({ type: 9, meta: { what: 'req' }, data: Buffer.alloc(0) }), 'remote');
    expect(reqErr.message).toBe('cannot apply req');
    await session.send({ type: 9, meta: { what: 'msg' }, data: Buffer.alloc(0) });
    const flushErr = await expectCode(session.flush(), 'remote');
    expect(flushErr.message).toBe('cannot apply msg');
    await session.flush(); // reported once; the session goes on
    expect((await session.request({ type: 2, meta: { q: 'again' }, data: Buffer.alloc(0) })).meta).toEqual({ echo: 'again' });
    await expectCode(session.send({ type: 0, meta: {}, data: Buffer.alloc(0) }), 'bad_message');

    expect(server.sessions()).toBe(1);
    await session.close();
    await expectCode(session.send({ type: 1, meta: {}, data: Buffer.alloc(0) }), 'closed');
    for (let i = 0; i < 50 && closed === 0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(closed).toBe(1);
    expect(server.sessions()).toBe(0);
  });

  it('9) works over TLS with a self-signed certificate', async () => {
    let cert: Buffer;
    let key: Buffer;
    try {
      const tlsDir = fs.mkdtempSync(path.join(dir, 'tls-'));
      execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-days', '1',
        '-addext', 'subjectAltName=DNS:localhost', '-keyout', path.join(tlsDir, 'key.pem'), '-out', path.join(tlsDir, 'cert.pem')], { stdio: 'ignore' });
      cert = fs.readFileSync(path.join(tlsDir, 'cert.pem'));
      key = fs.readFileSync(path.join(tlsDir, 'key.pem'));
    } catch (err) {
      console.warn(`skipping the TLS test: openssl could not make a certificate (${(err as Error).message})`);
      return;
    }
    const image = sourceImage(100);
    const { target, handler } = fileTarget('t9.img', image);
    const server = await startServer({ accept: async () => handler, tls: { cert, key } });
    const session = await startClient(server.port, { tls: { ca: cert, servername: 'localhost' } });
    await sendImage(session, image);
    expect(targetHash(target, image.length)).toBe(sha256(image));
    // A client that does not speak TLS, or does not trust the certificate, gets nowhere.
    await expect(connect({ address: `127.0.0.1:${server.port}`, secret: SECRET, identity: IDENTITY, handshakeTimeoutMs: 2000 })).rejects.toBeInstanceOf(DataPlaneError);
    await expectCode(connect({ address: `127.0.0.1:${server.port}`, secret: SECRET, identity: IDENTITY, tls: { servername: 'localhost' } }), 'connect_failed');
  });

  it('10) after a server restart the client resumes into a new server and completes', async () => {
    const image = sourceImage(400);
    const { target, handler } = fileTarget('t10.img', image);
    let server = await startServer({ accept: async () => handler });
    const port = server.port;
    const session = await startClient(port);
    const half = image.length / 2;
    await sendImage(session, image.subarray(0, half));
    await server.close();
    server = await startServer({ accept: async () => handler, port });
    for (let off = half; off < image.length; off += BLOCK) {
      await session.send({ type: MSG_BLOCK, meta: { offset: off }, data: image.subarray(off, off + BLOCK) });
    }
    await session.flush();
    expect(session.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(targetHash(target, image.length)).toBe(sha256(image));
  });

  it('11b) the server forgets a session that stays disconnected for sessionIdleMs, and calls onClose', async () => {
    let closed = 0;
    const server = await startServer({ sessionIdleMs: 300, accept: async () => ({ onMessage: async () => undefined, onClose: () => void closed++ }) });
    const proxy = new FaultProxy(server.port);
    await proxy.start();
    const session = await startClient(proxy.port, { reconnectTimeoutMs: 5000 });
    await session.send({ type: MSG_BLOCK, meta: {}, data: randomBytes(100) });
    await session.flush();
    expect(server.sessions()).toBe(1);
    await proxy.stop(); // the client cannot come back
    await new Promise((r) => setTimeout(r, 150));
    expect(server.sessions()).toBe(1);
    await new Promise((r) => setTimeout(r, 400));
    expect(server.sessions()).toBe(0);
    expect(closed).toBe(1);
  });

  it('11) fails pending operations with "disconnected" when the server stays away', async () => {
    const server = await startServer({ accept: async () => ({ onMessage: () => new Promise(() => undefined) }) });
    const errors: Error[] = [];
    const session = await startClient(server.port, { reconnectTimeoutMs: 800, onReconnectError: (e) => errors.push(e) });
    await session.send({ type: MSG_BLOCK, meta: {}, data: randomBytes(1000) });
    const flushed = session.flush();
    await server.close();
    const err = await expectCode(flushed, 'disconnected');
    expect(err.message).toMatch(/could not resume within 800 ms/);
    expect(errors.length).toBeGreaterThan(0);
    await expectCode(session.send({ type: MSG_BLOCK, meta: {}, data: Buffer.alloc(1) }), 'disconnected');
  });
});

describe('urgent messages', () => {
  /** A server that records the order in which it applied messages (meta.i), taking `applyMs` for each. */
  async function orderedServer(applyMs = 0): Promise<{ server: DataPlaneServer; order: number[] }> {
    const order: number[] = [];
    const server = await startServer({
      accept: async () => ({
        onMessage: async (_s, msg) => {
          if (applyMs > 0) await new Promise((r) => setTimeout(r, applyMs));
          order.push(msg.meta.i as number);
        },
      }),
    });
    return { server, order };
  }

  /** Queues `n` bulk messages without waiting for the window (their promises are returned). */
  function queueBulk(session: DataPlaneSession, n: number, bytes = BLOCK): Promise<void>[] {
    const sends: Promise<void>[] = [];
    for (let i = 0; i < n; i++) sends.push(session.send({ type: MSG_BLOCK, meta: { i }, data: randomBytes(bytes) }));
    return sends;
  }

  it('12) an urgent message overtakes the bulk queued in the window and the bandwidth limiter, which still holds the rate', async () => {
    const { server, order } = await orderedServer();
    const session = await startClient(server.port, { bandwidthBytesPerSecond: 1024 * 1024, windowBytes: 16 * 1024 * 1024 });
    const t0 = performance.now();
    const bulk = queueBulk(session, 24); // 1.5 MiB: about 1.5 s at 1 MiB/s
    await new Promise((r) => setTimeout(r, 100));
    await session.send({ type: MSG_BLOCK, meta: { i: -1 }, data: randomBytes(BLOCK) }, { urgent: true });
    await Promise.all(bulk);
    await session.flush();
    // Behind the urgent message: only what was already written (one frame, and one in the limiter's debt).
    expect(order.indexOf(-1)).toBeLessThanOrEqual(3);
    expect(order.filter((i) => i >= 0)).toEqual([...Array(24).keys()]);
    // The urgent bytes were charged: 25 blocks at 1 MiB/s take about 1.5 s (burst allowances aside).
    expect(performance.now() - t0).toBeGreaterThanOrEqual(1000);
  });

  it('13) with write-ahead, an urgent message waits only for what was written, not for the whole window', async () => {
    const { server, order } = await orderedServer(3);
    const session = await startClient(server.port, { windowBytes: 16 * 1024 * 1024, writeAheadBytes: 4 * BLOCK });
    const bulk = queueBulk(session, 120);
    await new Promise((r) => setTimeout(r, 30));
    const before = order.length;
    await session.send({ type: MSG_BLOCK, meta: { i: -1 }, data: randomBytes(BLOCK) }, { urgent: true });
    await Promise.all(bulk);
    await session.flush();
    expect(order.indexOf(-1) - before).toBeLessThanOrEqual(6);
    expect(order.filter((i) => i >= 0)).toEqual([...Array(120).keys()]);
  });

  it('14) urgent messages past a full window and across reconnects: every message applied exactly once', async () => {
    const image = sourceImage(600);
    const { target, handler } = fileTarget('t14.img', image);
    const server = await startServer({ accept: async () => handler });
    const proxy = new FaultProxy(server.port);
    await proxy.start();
    proxy.cutAt = 12 * 1024 * 1024;
    const session = await startClient(proxy.port, { windowBytes: 512 * 1024, writeAheadBytes: 256 * 1024 });
    const sends: Promise<void>[] = [];
    for (let off = 0; off < image.length; off += BLOCK) {
      const msg = { type: MSG_BLOCK, meta: { offset: off }, data: image.subarray(off, off + BLOCK) };
      // Every 5th block urgent, sent without waiting: it must not wait for the (full) window.
      if ((off / BLOCK) % 5 === 0) sends.push(session.send(msg, { urgent: true }));
      else await session.send(msg);
    }
    await Promise.all(sends);
    await session.flush();
    expect(session.stats.reconnects).toBeGreaterThanOrEqual(1);
    expect(targetHash(target, image.length)).toBe(sha256(image));
    expect(target.applied).toBe(600);
    expect([...target.appliedOffsets.values()].every((n) => n === 1)).toBe(true);
    expect(session.stats.inFlight).toBe(0);
  });
});
