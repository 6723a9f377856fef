// Ferry's NBD client against a scripted server: replies out of order and in pieces, error chunks,
// size constraints, fallbacks, and every kind of broken reply the client must refuse.
import { promises as fs } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdClient, type NbdConnectOptions } from '../../nbd/client';
import { NbdCommandError, NbdConnectError, NbdDisconnectedError, NbdProtocolError } from '../../nbd/errors';
import {
  CLISERV_MAGIC,
  Cmd,
  decodeGo,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeRequest,
  encodeBlockStatus,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeMetaContextReply,
  encodeOffsetData,
  encodeOffsetHole,
  encodeOptionReply,
  encodeServerGreeting,
  encodeSimpleReply,
  NBDMAGIC,
  NbdErrno,
  Option,
  OPTION_HEADER_BYTES,
  ReplyFlag,
  Rep,
  REQUEST_BYTES,
  TransmissionFlag,
  type BlockSizes,
  type RawRequest,
} from '../../nbd/protocol';
import { RawPeer } from '../support/nbd-peer';

const SIZE = 1 << 20;
const FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA;

interface FakeOptions {
  structured?: boolean;
  go?: boolean;
  blockSizes?: BlockSizes;
  greeting?: Buffer;
}

/** The server's side of one connection, after the handshake. */
class Script {
  constructor(readonly peer: RawPeer) {}
  async request(): Promise<RawRequest & { payload?: Buffer }> {
    const r = decodeRequest(await this.peer.reader.read(REQUEST_BYTES));
    return r.type === Cmd.WRITE ? { ...r, payload: await this.peer.reader.read(r.length) } : r;
  }
  send(...parts: Buffer[]): void {
    this.peer.write(...parts);
  }
}

let dir: string;
const servers: net.Server[] = [];
const sockets = new Set<net.Socket>();
beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-nbdcu-'));
});
afterAll(async () => {
  for (const s of sockets) s.destroy();
  await Promise.all(servers.map((s) => new Promise((res) => s.close(res))));
  await fs.rm(dir, { recursive: true, force: true });
});

/** A server that shakes hands as told, then runs `script` on the connection. */
async function fake(script: (s: Script) => Promise<void>, opts: FakeOptions = {}): Promise<string> {
  const sock = path.join(dir, `s${servers.length}.sock`);
  const server = net.createServer(async (socket) => {
    socket.on('error', () => undefined);
    sockets.add(socket);
    const peer = new RawPeer(socket);
    try {
      peer.write(opts.greeting ?? encodeServerGreeting(3));
      if (opts.greeting) return void socket.end();
      await peer.reader.read(4);
      for (let id = 7; ; ) {
        const { option, length } = decodeOptionHeader(await peer.reader.read(OPTION_HEADER_BYTES));
        const data = await peer.reader.read(length);
        if (option === Option.STRUCTURED_REPLY) peer.write(encodeOptionReply(option, opts.structured === false ? Rep.ERR_UNSUP : Rep.ACK));
        else if (option === Option.SET_META_CONTEXT) {
          for (const q of decodeMetaContextRequest(data).queries) peer.write(encodeOptionReply(option, Rep.META_CONTEXT, encodeMetaContextReply(id++, q)));
          peer.write(encodeOptionReply(option, Rep.ACK));
        } else if (option === Option.GO && opts.go !== false) {
          decodeGo(data);
          peer.write(encodeOptionReply(option, Rep.INFO, encodeInfoExport(SIZE, FLAGS)));
          if (opts.blockSizes) peer.write(encodeOptionReply(option, Rep.INFO, encodeInfoBlockSize(opts.blockSizes)));
          peer.write(encodeOptionReply(option, Rep.INFO, Buffer.from([0, 99, 1, 2])), encodeOptionReply(option, Rep.ACK)); // an unknown info type, to ignore
          break;
        } else if (option === Option.EXPORT_NAME) {
          peer.write(encodeExportNameReply(SIZE, FLAGS, false));
          break;
        } else peer.write(encodeOptionReply(option, Rep.ERR_UNSUP));
      }
      await script(new Script(peer));
    } catch {
      socket.destroy();
    }
  });
  await new Promise<void>((res) => server.listen(sock, res));
  servers.push(server);
  return sock;
}

const connect = (sock: string, extra: Partial<NbdConnectOptions> = {}) => NbdClient.connect({ path: sock }, { exportName: 'd', ...extra });

describe('NBD client replies', () => {
  it('assembles reads from chunks in any order and matches replies out of order', async () => {
    const sock = await fake(async (s) => {
      const a = await s.request();
      const b = await s.request();
      // b first: its second half as data, then its first half as a hole.
      const [h, d] = encodeOffsetData(0, b.cookie, 6144, Buffer.alloc(2048, 0xbb));
      s.send(h, d, encodeOffsetHole(ReplyFlag.DONE, b.cookie, 4096, 2048));
      const [h2, d2] = encodeOffsetData(0, a.cookie, 0, Buffer.alloc(512, 0xaa));
      s.send(h2, d2, encodeChunkHeader(ReplyFlag.DONE, 0, a.cookie, 0));
      const w = await s.request();
      expect(w.payload?.toString()).toBe('hi');
      s.send(encodeSimpleReply(0, w.cookie));
      await s.request(); // DISC
    });
    const c = await connect(sock);
    const [ra, rb] = await Promise.all([c.read(0, 512), c.read(4096, 4096)]);
    expect(ra.equals(Buffer.alloc(512, 0xaa))).toBe(true);
    expect(rb.equals(Buffer.concat([Buffer.alloc(2048), Buffer.alloc(2048, 0xbb)]))).toBe(true);
    await c.write(10, Buffer.from('hi'));
    await c.close();
  });

  it("reports error chunks by their NBD name and message, and stays usable", async () => {
    const sock = await fake(async (s) => {
      const r1 = await s.request();
      s.send(encodeErrorChunk(ReplyFlag.DONE, r1.cookie, NbdErrno.ENOSPC, 'no room'));
      const r2 = await s.request();
      const offsetError = Buffer.alloc(6 + 4 + 8);
      offsetError.writeUInt32BE(NbdErrno.EIO, 0);
      offsetError.writeUInt16BE(4, 4);
      offsetError.write('bad!', 6);
      offsetError.writeBigUInt64BE(BigInt(r2.offset), 10);
      s.send(encodeChunkHeader(ReplyFlag.DONE, 0x8002, r2.cookie, offsetError.length), offsetError);
      const r3 = await s.request();
      const odd = Buffer.alloc(6);
      odd.writeUInt32BE(4242, 0);
      s.send(encodeChunkHeader(ReplyFlag.DONE, 0x8077, r3.cookie, 6), odd); // unknown error type: an error all the same
      const r4 = await s.request();
      s.send(encodeSimpleReply(NbdErrno.EPERM, r4.cookie));
      const r5 = await s.request();
      s.send(encodeSimpleReply(0, r5.cookie));
    });
    const c = await connect(sock);
    await expect(c.write(0, Buffer.alloc(8))).rejects.toMatchObject({ errnoName: 'NBD_ENOSPC', serverMessage: 'no room', command: 'NBD_CMD_WRITE' });
    const e2 = (await c.read(512, 512).catch((e) => e)) as NbdCommandError;
    expect(e2).toBeInstanceOf(NbdCommandError);
    expect(e2.message).toMatch(/NBD_CMD_READ of 512 bytes at 512 .* failed: NBD_EIO \(bad!\)/);
    await expect(c.read(0, 1)).rejects.toMatchObject({ errno: 4242, errnoName: 'NBD_(unknown 4242)' });
    await expect(c.flush()).rejects.toMatchObject({ errnoName: 'NBD_EPERM' });
    await c.flush();
    expect(c.closed).toBe(false);
  });

  it('returns the extents of the context asked for, and maps a range through short answers', async () => {
    const sock = await fake(async (s) => {
      for (;;) {
        const r = await s.request();
        if (r.type === Cmd.DISC) return;
        const at = Number(r.offset);
        // Context 7 (base:allocation) one 64 KiB extent at a time; context 8 the whole rest, dirty.
        s.send(encodeBlockStatus(0, r.cookie, 8, [{ length: SIZE - at, flags: 1 }]), encodeBlockStatus(ReplyFlag.DONE, r.cookie, 7, [{ length: 65536, flags: at < 131072 ? 3 : 0 }]));
      }
    });
    const c = await connect(sock, { metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b'] });
    expect([...c.contexts]).toEqual([['base:allocation', 7], ['qemu:dirty-bitmap:b', 8]]);
    expect(await c.blockStatus('qemu:dirty-bitmap:b', 4096, 8192)).toEqual([{ offset: 4096, length: 8192, flags: 1 }]);
    expect(await c.mapExtents('base:allocation')).toEqual([{ offset: 0, length: 131072, flags: 3 }, { offset: 131072, length: SIZE - 131072, flags: 0 }]);
    await c.close();
  });

  it('splits at the maximum payload, keeps to maxInFlight, and refuses unaligned requests', async () => {
    const seen: number[] = [];
    const sock = await fake(
      async (s) => {
        const first = [await s.request(), await s.request()];
        const third = s.request();
        const early = await Promise.race([third.then(() => true), new Promise<boolean>((res) => setTimeout(() => res(false), 200))]);
        seen.push(early ? -1 : 0); // maxInFlight 2: the third waits for a reply
        for (const r of first) {
          seen.push(r.length);
          const [h, d] = encodeOffsetData(ReplyFlag.DONE, r.cookie, Number(r.offset), Buffer.alloc(r.length, 1));
          s.send(h, d);
        }
        for (let next = third; ; next = s.request()) {
          const r = await next;
          if (r.type === Cmd.DISC) return;
          seen.push(r.length);
          const [h, d] = encodeOffsetData(ReplyFlag.DONE, r.cookie, Number(r.offset), Buffer.alloc(r.length, 1));
          s.send(h, d);
        }
      },
      { blockSizes: { minimum: 512, preferred: 4096, maximum: 8192 } },
    );
    const c = await connect(sock, { maxInFlight: 2 });
    expect(c.blockSizes).toEqual({ minimum: 512, preferred: 4096, maximum: 8192 });
    await expect(c.read(100, 512)).rejects.toThrow(/minimum block size is 512/);
    const data = await c.read(0, 20480);
    expect(data.equals(Buffer.alloc(20480, 1))).toBe(true);
    expect(seen).toEqual([0, 8192, 8192, 4096]);
    await c.close();
  });
});

describe('NBD client handshake', () => {
  it('falls back to simple replies, and to EXPORT_NAME when GO is unknown', async () => {
    const sock = await fake(
      async (s) => {
        const r = await s.request();
        s.send(encodeSimpleReply(0, r.cookie), Buffer.alloc(r.length, 7));
      },
      { structured: false, go: false },
    );
    const c = await connect(sock);
    expect(c.structuredReplies).toBe(false);
    expect(c.size).toBe(SIZE);
    expect((await c.read(0, 100)).equals(Buffer.alloc(100, 7))).toBe(true);
  });

  it('needs structured replies for metadata contexts', async () => {
    const sock = await fake(async () => undefined, { structured: false });
    await expect(connect(sock, { metaContexts: ['base:allocation'] })).rejects.toThrow(/no structured replies, so no metadata contexts/);
  });

  it('refuses an oldstyle server and a peer that is not NBD', async () => {
    const old = Buffer.alloc(18);
    old.writeBigUInt64BE(NBDMAGIC, 0);
    old.writeBigUInt64BE(CLISERV_MAGIC, 8);
    await expect(connect(await fake(async () => undefined, { greeting: old }))).rejects.toThrow(/oldstyle/);
    await expect(connect(await fake(async () => undefined, { greeting: Buffer.from('SSH-2.0-OpenSSH_9.2\r\n') }))).rejects.toThrow(/not an NBD server/);
    const e = await connect(await fake(async () => undefined, { greeting: Buffer.alloc(4) })).catch((err) => err);
    expect(e).toBeInstanceOf(NbdConnectError);
    expect(e.message).toMatch(/closed the connection during the handshake/);
  });

  it('times out a server that never finishes the handshake', async () => {
    const sock = path.join(dir, 'silent.sock');
    const silent = net.createServer((socket) => sockets.add(socket));
    await new Promise<void>((res) => silent.listen(sock, res));
    servers.push(silent);
    await expect(connect(sock, { timeoutMs: 200 })).rejects.toThrow(/no NBD handshake from unix:.* within 200 ms/);
  });
});

describe('NBD client refuses broken replies', () => {
  const cases: [string, (s: Script, r: RawRequest) => void, RegExp][] = [
    ['overlapping chunks', (s, r) => {
      const [h, d] = encodeOffsetData(0, r.cookie, 0, Buffer.alloc(512));
      s.send(h, d, encodeOffsetHole(ReplyFlag.DONE, r.cookie, 256, 512));
    }, /overlaps an earlier chunk/],
    ['a reply that ends before covering the request', (s, r) => s.send(encodeOffsetHole(ReplyFlag.DONE, r.cookie, 0, 512)), /done after 512 of 1024 bytes/],
    ['data outside the request', (s, r) => s.send(encodeOffsetHole(ReplyFlag.DONE, r.cookie, 4096, 512)), /outside the request/],
    ['a reply for a cookie nobody sent', (s, r) => s.send(encodeSimpleReply(0, r.cookie + 100n)), /no request in flight has/],
    ['a simple reply to READ after structured replies', (s, r) => s.send(encodeSimpleReply(0, r.cookie)), /simple reply to NBD_CMD_READ/],
    ['a bad magic', (s) => s.send(Buffer.alloc(16, 0x42)), /reply magic 0x42424242/],
    ['an unknown chunk type', (s, r) => s.send(encodeChunkHeader(ReplyFlag.DONE, 99, r.cookie, 0)), /unknown chunk type/],
    ['an error message longer than its chunk', (s, r) => {
      const p = Buffer.alloc(6);
      p.writeUInt32BE(5, 0);
      p.writeUInt16BE(100, 4);
      s.send(encodeChunkHeader(ReplyFlag.DONE, 0x8001, r.cookie, 6), p);
    }, /message length 100 does not fit/],
    ['NONE without DONE', (s, r) => s.send(encodeChunkHeader(0, 0, r.cookie, 0)), /NONE must be empty and final/],
  ];

  it.each(cases)('%s: fails everything in flight with NbdProtocolError and closes', async (_name, reply, message) => {
    const sock = await fake(async (s) => {
      const r = await s.request();
      await s.request(); // the second read, left unanswered
      reply(s, r);
    });
    const c = await connect(sock);
    const reasons: (Error | null)[] = [];
    c.onClose((r) => reasons.push(r));
    const [first, second] = await Promise.all([c.read(0, 1024).catch((e) => e), c.read(8192, 512).catch((e) => e)]);
    expect(first).toBeInstanceOf(NbdProtocolError);
    expect(first.message).toMatch(message);
    expect(second).toBe(first);
    expect(c.closed).toBe(true);
    expect(reasons).toEqual([first]);
    await expect(c.read(0, 1)).rejects.toBeInstanceOf(NbdProtocolError);
  });

  it('fails requests in flight with NbdDisconnectedError when the server goes away', async () => {
    const sock = await fake(async (s) => {
      await s.request();
      s.peer.stream.destroy();
    });
    const c = await connect(sock);
    const err = await c.read(0, 512).catch((e) => e);
    expect(err).toBeInstanceOf(NbdDisconnectedError);
    expect(err.message).toMatch(/NBD server at unix:.* \(export 'd'\) is gone/);
  });
});
