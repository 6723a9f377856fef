// Ferry's NBD server, byte by byte: the spec's refusals of malformed handshakes and requests,
// concurrent out-of-order replies, error mapping, and a fuzzed option/request parser that must
// never hang, crash or stop serving other clients.
import { promises as fs } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import type { NbdBackend } from '../../nbd/backend';
import { NbdClient } from '../../nbd/client';
import { NbdBackendError, NbdError } from '../../nbd/errors';
import {
  Cmd,
  CmdFlag,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeInfoReply,
  DEFAULT_MAX_PAYLOAD,
  encodeGo,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  Info,
  NbdErrno,
  Option,
  ReplyFlag,
  ReplyType,
  Rep,
  State,
  u32,
} from '../../nbd/protocol';
import { MAX_OPTION_DATA } from '../../nbd/server-connection';
import { NbdServer } from '../../nbd/server';
import { FUZZ_SEED, boundedRun, mutated, randomBytes as randomInput, spliced } from '../support/fuzz';
import { duplexPair, MemoryBackend, RawPeer, type Reply } from '../support/nbd-peer';

const SIZE = 1 << 20;

function setup(exports: Record<string, NbdBackend>) {
  const errors: Error[] = [];
  const server = NbdServer.detached({ exports, onError: (e) => errors.push(e) });
  const connect = () => {
    const [client, serverSide] = duplexPair();
    const served = server.serve(serverSide);
    return { peer: new RawPeer(client), served };
  };
  return { server, errors, connect };
}

const errorOf = (r: Reply): number => {
  if (r.kind === 'simple') return r.error;
  expect(r.type).toBe(ReplyType.ERROR);
  expect(r.flags & ReplyFlag.DONE).toBe(ReplyFlag.DONE);
  return decodeErrorChunk(r.type, r.payload).error;
};

describe('NBD server handshake', () => {
  const disk = new MemoryBackend(SIZE);
  const { connect, errors } = setup({ disk0: disk, ro: new MemoryBackend(SIZE, { readOnly: true }) });

  it('drops a client that sets unknown flags', async () => {
    const { peer, served } = connect();
    await peer.greeting();
    peer.write(u32(0x80));
    expect(await peer.closed()).toBe(true);
    await served;
    expect(errors.pop()?.message).toMatch(/unknown client flags 0x80/);
  });

  it("answers unknown and malformed options with the spec's errors and goes on", async () => {
    const { peer } = connect();
    expect(await peer.greeting()).toBe(3); // FIXED_NEWSTYLE | NO_ZEROES
    peer.write(u32(3));
    expect((await peer.option(99))[0]).toMatchObject({ option: 99, type: Rep.ERR_UNSUP });
    expect((await peer.option(Option.STARTTLS))[0].type).toBe(Rep.ERR_UNSUP);
    expect((await peer.option(Option.LIST, Buffer.from('x')))[0].type).toBe(Rep.ERR_INVALID);
    expect((await peer.option(Option.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: 'disk0', queries: ['base:allocation'] })))[0].type).toBe(Rep.ERR_INVALID);
    expect((await peer.option(Option.STRUCTURED_REPLY, Buffer.from('x')))[0].type).toBe(Rep.ERR_INVALID);
    expect((await peer.option(Option.STRUCTURED_REPLY))[0].type).toBe(Rep.ACK);
    expect((await peer.option(Option.STRUCTURED_REPLY))[0].type).toBe(Rep.ERR_INVALID);
    expect((await peer.option(Option.GO, Buffer.from([0, 0, 0, 9, 1])))[0].type).toBe(Rep.ERR_INVALID);
    expect((await peer.option(Option.GO, Buffer.concat([encodeGo({ exportName: 'disk0', infoRequests: [] }), Buffer.from([7])])))[0].type).toBe(Rep.ERR_INVALID);
    const unknown = await peer.option(Option.GO, encodeGo({ exportName: 'nope', infoRequests: [] }));
    expect(unknown).toHaveLength(1);
    expect(unknown[0].type).toBe(Rep.ERR_UNKNOWN);
    expect(unknown[0].data.toString()).toMatch(/no export 'nope' \(exports: 'disk0', 'ro'\)/);
    expect((await peer.option(Option.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: 'disk0', queries: ['nocolon'] })))[0].type).toBe(Rep.ERR_INVALID);
    expect((await peer.option(Option.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: 'nope', queries: ['base:allocation'] })))[0].type).toBe(Rep.ERR_UNKNOWN);
    const listed = await peer.option(Option.LIST_META_CONTEXT, encodeMetaContextRequest({ exportName: 'disk0', queries: ['base:'] }));
    expect(listed.map((r) => [r.type, r.data.subarray(4).toString()])).toEqual([[Rep.META_CONTEXT, 'base:allocation'], [Rep.ACK, '']]);
    expect((await peer.option(Option.LIST_META_CONTEXT, encodeMetaContextRequest({ exportName: 'disk0', queries: ['qemu:dirty-bitmap:x'] }))).map((r) => r.type)).toEqual([Rep.ACK]);
    const list = await peer.option(Option.LIST);
    expect(list.map((r) => r.type)).toEqual([Rep.SERVER, Rep.SERVER, Rep.ACK]);
    const info = await peer.option(Option.INFO, encodeGo({ exportName: 'ro', infoRequests: [Info.NAME] }));
    const decoded = info.slice(0, -1).map((r) => decodeInfoReply(r.data));
    expect(decoded).toEqual(expect.arrayContaining([{ type: Info.EXPORT, size: SIZE, flags: expect.any(Number) }, { type: Info.NAME, name: 'ro' }, { type: Info.BLOCK_SIZE, sizes: { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD } }]));
    const go = await peer.option(Option.GO, encodeGo({ exportName: 'disk0', infoRequests: [] }));
    expect(go[go.length - 1].type).toBe(Rep.ACK);
    peer.request({ type: Cmd.READ, cookie: 5n, length: 512 });
    expect(await peer.reply()).toMatchObject({ kind: 'chunk', type: ReplyType.OFFSET_HOLE, cookie: 5n });
  });

  it('refuses oversized option data with NBD_REP_ERR_TOO_BIG and drops the client', async () => {
    const { peer } = connect();
    await peer.greeting();
    peer.write(u32(1), encodeOption(Option.LIST, Buffer.alloc(MAX_OPTION_DATA + 1)));
    expect((await peer.optionReply()).type).toBe(Rep.ERR_TOO_BIG);
    expect(await peer.closed()).toBe(true);
  });

  it('drops a client whose option lacks the IHAVEOPT magic', async () => {
    const { peer } = connect();
    await peer.greeting();
    peer.write(u32(1), Buffer.alloc(16, 0x41));
    expect(await peer.closed()).toBe(true);
  });

  it('ends the session on EXPORT_NAME for an unknown export, which cannot carry an error', async () => {
    const { peer } = connect();
    await peer.greeting();
    peer.write(u32(1), encodeOption(Option.EXPORT_NAME, Buffer.from('nope')));
    expect(await peer.closed()).toBe(true);
  });

  it('answers EXPORT_NAME with size, flags and 124 zeroes unless NO_ZEROES was agreed', async () => {
    for (const [flags, bytes] of [[1, 134], [3, 10]]) {
      const { peer } = connect();
      await peer.greeting();
      peer.write(u32(flags), encodeOption(Option.EXPORT_NAME, Buffer.from('disk0')));
      const reply = await peer.reader.read(bytes);
      expect(Number(reply.readBigUInt64BE(0))).toBe(SIZE);
      peer.request({ type: Cmd.FLUSH, cookie: 9n });
      expect(await peer.reply()).toEqual({ kind: 'simple', error: 0, cookie: 9n });
    }
  });

  it('acknowledges ABORT and closes', async () => {
    const { peer } = connect();
    await peer.greeting();
    peer.write(u32(1));
    expect((await peer.option(Option.ABORT))[0].type).toBe(Rep.ACK);
    expect(await peer.closed()).toBe(true);
  });
});

describe('NBD server transmission', () => {
  it("refuses bad requests with the spec's errors and keeps the connection", async () => {
    const disk = new MemoryBackend(SIZE, { blockSizes: { maximum: 65536 } });
    const { connect } = setup({ disk0: disk, ro: new MemoryBackend(SIZE, { readOnly: true }) });
    const { peer } = connect();
    await peer.open('disk0');
    const ask = async (r: Parameters<RawPeer['request']>[0], payload?: Buffer) => {
      peer.request(r, payload);
      return errorOf(await peer.reply());
    };
    expect(await ask({ type: 99 })).toBe(NbdErrno.EINVAL);
    expect(await ask({ type: Cmd.READ, flags: CmdFlag.REQ_ONE, length: 512 })).toBe(NbdErrno.EINVAL);
    expect(await ask({ type: Cmd.READ, offset: SIZE - 10, length: 20 })).toBe(NbdErrno.EINVAL);
    expect(await ask({ type: Cmd.READ, offset: 2 ** 62, length: 1 })).toBe(NbdErrno.EINVAL);
    expect(await ask({ type: Cmd.WRITE, offset: SIZE - 10 }, Buffer.alloc(20, 1))).toBe(NbdErrno.ENOSPC);
    expect(await ask({ type: Cmd.WRITE_ZEROES, offset: SIZE, length: 1 })).toBe(NbdErrno.ENOSPC);
    expect(await ask({ type: Cmd.WRITE_ZEROES, flags: CmdFlag.FAST_ZERO, length: 512 })).toBe(NbdErrno.EINVAL);
    expect(await ask({ type: Cmd.BLOCK_STATUS, length: 512 })).toBe(NbdErrno.EINVAL);
    expect(await ask({ type: Cmd.FLUSH, offset: 512 })).toBe(NbdErrno.EINVAL);
    expect(disk.data.every((b) => b === 0)).toBe(true); // nothing refused was written
    const { peer: ro } = connect();
    await ro.open('ro', { structured: false });
    ro.request({ type: Cmd.WRITE, cookie: 2n }, Buffer.alloc(512));
    expect(await ro.reply()).toEqual({ kind: 'simple', error: NbdErrno.EPERM, cookie: 2n });
    ro.request({ type: Cmd.WRITE_ZEROES, cookie: 3n, length: 512 });
    expect(await ro.reply()).toEqual({ kind: 'simple', error: NbdErrno.EPERM, cookie: 3n });
    ro.request({ type: Cmd.READ, cookie: 4n, length: DEFAULT_MAX_PAYLOAD + 1 });
    expect(await ro.reply()).toEqual({ kind: 'simple', error: NbdErrno.EINVAL, cookie: 4n });
    ro.request({ type: Cmd.READ, cookie: 5n, offset: 4, length: 8 });
    expect(await ro.reply()).toEqual({ kind: 'simple', error: 0, cookie: 5n });
    expect((await ro.reader.read(8)).equals(Buffer.alloc(8))).toBe(true);
    // Still serving: a write lands and reads back as data.
    peer.request({ type: Cmd.WRITE, cookie: 7n, offset: 100, flags: CmdFlag.FUA }, Buffer.from('ferry'));
    expect(await peer.reply()).toEqual({ kind: 'simple', error: 0, cookie: 7n });
    peer.request({ type: Cmd.READ, cookie: 8n, offset: 98, length: 9, flags: CmdFlag.DF });
    const data = await peer.reply();
    expect(data).toMatchObject({ kind: 'chunk', type: ReplyType.OFFSET_DATA, cookie: 8n, flags: ReplyFlag.DONE });
    expect((data as { payload: Buffer }).payload.subarray(8).toString('latin1')).toBe('\0\0ferry\0\0');
    peer.request({ type: Cmd.READ, cookie: 9n, length: 65537 });
    expect(await peer.reply().then(errorOf)).toBe(NbdErrno.EOVERFLOW);
  });

  it('drops a client that breaks the framing (bad magic, a WRITE above the maximum payload)', async () => {
    const { connect } = setup({ disk0: new MemoryBackend(SIZE) });
    const bad = connect();
    await bad.peer.open('disk0');
    bad.peer.write(Buffer.alloc(28, 0x55));
    expect(await bad.peer.closed()).toBe(true);
    const big = connect();
    await big.peer.open('disk0');
    big.peer.write(encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 1n, offset: 0, length: DEFAULT_MAX_PAYLOAD + 1 }));
    expect(await big.peer.closed()).toBe(true);
  });

  it('serves requests concurrently and replies in the order they finish', async () => {
    let openGate!: () => void;
    const gate = new Promise<void>((res) => (openGate = res));
    const disk = new MemoryBackend(SIZE);
    const slow: NbdBackend = { size: SIZE, read: async (o, l) => (o === 0 ? gate.then(() => disk.read(o, l)) : disk.read(o, l)), write: (o, d) => disk.write(o, d), flush: async () => undefined };
    const { connect } = setup({ disk0: slow });
    const { peer } = connect();
    await peer.open('disk0');
    peer.request({ type: Cmd.READ, cookie: 1n, offset: 0, length: 512 });
    peer.request({ type: Cmd.READ, cookie: 2n, offset: 4096, length: 512 });
    peer.request({ type: Cmd.WRITE, cookie: 3n, offset: 8192 }, Buffer.alloc(512, 1));
    const first = [await peer.reply(), await peer.reply()].map((r) => r.cookie).sort();
    expect(first).toEqual([2n, 3n]);
    openGate();
    expect((await peer.reply()).cookie).toBe(1n);
  });

  it("maps backend failures to NBD errors, reports them, and puts the backend's reason in the reply", async () => {
    const failing: NbdBackend = {
      size: SIZE,
      read: async (o) => {
        if (o === 0) throw new NbdBackendError('source unreachable', NbdErrno.EIO);
        throw new Error('plain failure');
      },
      write: async () => {
        throw Object.assign(new Error('quota'), { code: 'EDQUOT' });
      },
      flush: async () => {
        throw Object.assign(new Error('read-only fs'), { code: 'EROFS' });
      },
    };
    const { connect, errors } = setup({ bad: failing });
    const { peer } = connect();
    await peer.open('bad');
    const cases: [Parameters<RawPeer['request']>[0], Buffer | undefined, number, RegExp][] = [
      [{ type: Cmd.READ, length: 512 }, undefined, NbdErrno.EIO, /source unreachable/],
      [{ type: Cmd.READ, offset: 512, length: 512 }, undefined, NbdErrno.EIO, /plain failure/],
      [{ type: Cmd.WRITE }, Buffer.alloc(512), NbdErrno.ENOSPC, /quota/],
      [{ type: Cmd.FLUSH }, undefined, NbdErrno.EPERM, /read-only fs/],
      [{ type: Cmd.WRITE_ZEROES, length: 4096 }, undefined, NbdErrno.ENOSPC, /quota/],
    ];
    for (const [req, payload, errno, message] of cases) {
      peer.request(req, payload);
      const r = await peer.reply();
      expect(errorOf(r)).toBe(errno);
      expect(decodeErrorChunk(ReplyType.ERROR, (r as { payload: Buffer }).payload).message).toMatch(message);
    }
    expect(errors).toHaveLength(cases.length);
    expect(errors.every((e) => e instanceof NbdError && /on 'bad' failed: .*\(answered NBD_E/.test(e.message))).toBe(true);
  });

  it('answers base:allocation from the backend, clipped to the request, one extent with REQ_ONE', async () => {
    const disk = new MemoryBackend(SIZE);
    const sparse: NbdBackend = { ...disk, size: SIZE, read: disk.read.bind(disk), write: disk.write.bind(disk), flush: disk.flush.bind(disk), allocation: async () => [{ length: 4096, flags: 0 }, { length: SIZE, flags: State.HOLE | State.ZERO }] };
    const { connect } = setup({ sparse, plain: disk });
    const { peer } = connect();
    const go = await peer.open('sparse', { contexts: ['base:allocation'] });
    expect(go[go.length - 1].type).toBe(Rep.ACK);
    peer.request({ type: Cmd.BLOCK_STATUS, cookie: 1n, offset: 0, length: 65536 });
    const all = await peer.reply();
    expect(all).toMatchObject({ kind: 'chunk', type: ReplyType.BLOCK_STATUS, flags: ReplyFlag.DONE });
    expect(decodeBlockStatus((all as { payload: Buffer }).payload)).toEqual({ contextId: 1, extents: [{ length: 4096, flags: 0 }, { length: 61440, flags: 3 }] });
    peer.request({ type: Cmd.BLOCK_STATUS, cookie: 2n, flags: CmdFlag.REQ_ONE, offset: 0, length: 1000 });
    expect(decodeBlockStatus(((await peer.reply()) as { payload: Buffer }).payload).extents).toEqual([{ length: 1000, flags: 0 }]);
    // Contexts chosen for another export do not carry over to the one entered.
    const { peer: other } = connect();
    await other.greeting();
    other.write(u32(3));
    await other.option(Option.STRUCTURED_REPLY);
    await other.option(Option.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: 'sparse', queries: ['base:allocation'] }));
    await other.option(Option.GO, encodeGo({ exportName: 'plain', infoRequests: [] }));
    other.request({ type: Cmd.BLOCK_STATUS, length: 512 });
    expect(errorOf(await other.reply())).toBe(NbdErrno.EINVAL);
  });

  it('finishes the requests in flight on DISC, then closes', async () => {
    let openGate!: () => void;
    const gate = new Promise<void>((res) => (openGate = res));
    const disk = new MemoryBackend(SIZE);
    const { connect } = setup({ d: { size: SIZE, read: (o, l) => disk.read(o, l), write: async (o, d) => (await gate, disk.write(o, d)), flush: async () => undefined } });
    const { peer, served } = connect();
    await peer.open('d');
    peer.request({ type: Cmd.WRITE, cookie: 1n }, Buffer.from('late'));
    peer.request({ type: Cmd.DISC });
    setTimeout(openGate, 20);
    expect(await peer.reply()).toEqual({ kind: 'simple', error: 0, cookie: 1n });
    expect(await peer.closed()).toBe(true);
    await served;
    expect(disk.data.subarray(0, 4).toString()).toBe('late');
  });
});

describe(`NBD server parser fuzz (seed ${FUZZ_SEED})`, () => {
  /** Valid client streams: handshakes, then requests of every kind, to mutate. */
  function validStreams(): Buffer[] {
    const flags = u32(3);
    const sr = encodeOption(Option.STRUCTURED_REPLY);
    const meta = encodeOption(Option.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: 'disk0', queries: ['base:allocation'] }));
    const go = encodeOption(Option.GO, encodeGo({ exportName: 'disk0', infoRequests: [Info.BLOCK_SIZE, Info.NAME] }));
    const req = (type: number, offset: number, length: number, f = 0, payload = Buffer.alloc(0)) => Buffer.concat([encodeRequest({ type, flags: f, cookie: BigInt(type + 1), offset, length }), payload]);
    const requests = Buffer.concat([
      req(Cmd.READ, 0, 4096),
      req(Cmd.WRITE, 512, 8, CmdFlag.FUA, Buffer.from('ferry-nb')),
      req(Cmd.BLOCK_STATUS, 0, 65536, CmdFlag.REQ_ONE),
      req(Cmd.WRITE_ZEROES, 4096, 4096, CmdFlag.NO_HOLE),
      req(Cmd.TRIM, 0, 512),
      req(Cmd.CACHE, 0, 512),
      req(Cmd.FLUSH, 0, 0),
      req(Cmd.DISC, 0, 0),
    ]);
    return [
      Buffer.concat([flags, sr, meta, go, requests]),
      Buffer.concat([flags, encodeOption(Option.LIST), encodeOption(Option.INFO, encodeGo({ exportName: 'disk0', infoRequests: [] })), encodeOption(Option.EXPORT_NAME, Buffer.from('disk0')), requests]),
      Buffer.concat([flags, encodeOption(Option.LIST_META_CONTEXT, encodeMetaContextRequest({ exportName: 'disk0', queries: [] })), encodeOption(Option.ABORT)]),
      Buffer.concat([u32(1), go, requests]),
    ];
  }

  it('never hangs, crashes or reports a non-NBD error, and keeps serving other clients', async () => {
    const errors: Error[] = [];
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-nbdfuzz-'));
    const disk = new MemoryBackend(SIZE);
    const server = await NbdServer.listen({ path: path.join(dir, 's.sock') }, { exports: { disk0: disk }, onError: (e) => errors.push(e) });
    try {
      const valid = validStreams();
      const input = fc.oneof(mutated(valid), spliced(mutated(valid)), randomInput.map((b) => Buffer.concat([u32(3), b])), randomInput);
      let runs = 0;
      await fc.assert(
        fc.asyncProperty(input, async (bytes) => {
          runs++;
          const [client, serverSide] = duplexPair();
          client.resume(); // whatever the server answers is drained
          const served = server.serve(serverSide);
          client.end(bytes);
          let timer: NodeJS.Timeout | undefined;
          const outcome = await Promise.race([served.then(() => 'ended'), new Promise((res) => (timer = setTimeout(() => res('hung'), 5_000)))]);
          clearTimeout(timer);
          client.destroy();
          expect(outcome).toBe('ended');
        }),
        boundedRun(4_000),
      );
      expect(runs).toBeGreaterThan(50);
      expect(errors.filter((e) => !(e instanceof NbdError))).toEqual([]);
      const c = await NbdClient.connect({ path: path.join(dir, 's.sock') }, { exportName: 'disk0', metaContexts: ['base:allocation'] });
      await c.write(0, Buffer.from('still here'));
      expect((await c.read(0, 10)).toString()).toBe('still here');
      expect(await c.blockStatus('base:allocation', 0, 4096)).toEqual([{ offset: 0, length: 4096, flags: 0 }]);
      await c.close();
    } finally {
      await server.close();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
