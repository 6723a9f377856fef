// The NBD codecs: round trips of every structure, and malformed input refused with a reason.
import { PassThrough } from 'node:stream';
import { ByteReader } from '../../nbd/byte-reader';
import { NbdDisconnectedError } from '../../nbd/errors';
import {
  checkBlockSizes,
  cmdName,
  decodeBlockStatus,
  decodeChunkHeader,
  decodeErrorChunk,
  decodeGo,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeRequest,
  decodeServerReply,
  encodeBlockStatus,
  encodeErrorChunk,
  encodeGo,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeMetaContextRequest,
  encodeOffsetData,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeServerReply,
  encodeString,
  errnoFromCode,
  errnoName,
  Info,
  NbdErrno,
  Option,
  optionName,
  Rep,
  repName,
  ReplyFlag,
  ReplyType,
  readU64,
} from '../../nbd/protocol';

const refused = (fn: () => unknown, message: RegExp) => expect(fn).toThrow(expect.objectContaining({ name: 'NbdProtocolError', message: expect.stringMatching(message) }));

describe('NBD handshake codecs', () => {
  it('round-trips options, replies, GO, metadata contexts, exports and info', () => {
    const opt = encodeOption(Option.GO, Buffer.from('abc'));
    expect(decodeOptionHeader(opt)).toEqual({ option: Option.GO, length: 3 });
    expect(decodeOptionReplyHeader(encodeOptionReply(Option.LIST, Rep.ERR_UNKNOWN, Buffer.from('x')))).toEqual({ option: Option.LIST, type: Rep.ERR_UNKNOWN, length: 1 });
    expect(decodeGo(encodeGo({ exportName: 'disk0', infoRequests: [Info.BLOCK_SIZE, Info.NAME] }))).toEqual({ exportName: 'disk0', infoRequests: [3, 1] });
    expect(decodeGo(encodeGo({ exportName: '', infoRequests: [] }))).toEqual({ exportName: '', infoRequests: [] });
    const meta = { exportName: 'ex', queries: ['base:allocation', 'qemu:dirty-bitmap:r1'] };
    expect(decodeMetaContextRequest(encodeMetaContextRequest(meta))).toEqual(meta);
    expect(decodeMetaContextReply(encodeMetaContextReply(7, 'base:allocation'))).toEqual({ id: 7, name: 'base:allocation' });
    expect(decodeServerReply(encodeServerReply('disk0', 'the disk'))).toEqual({ name: 'disk0', description: 'the disk' });
    expect(decodeInfoReply(encodeInfoExport(2 ** 40 + 3, 0x1ed))).toEqual({ type: Info.EXPORT, size: 2 ** 40 + 3, flags: 0x1ed });
    expect(decodeInfoReply(encodeInfoBlockSize({ minimum: 512, preferred: 4096, maximum: 1 << 25 }))).toEqual({ type: Info.BLOCK_SIZE, sizes: { minimum: 512, preferred: 4096, maximum: 1 << 25 } });
    expect(decodeInfoReply(encodeInfoString(Info.NAME, 'n'))).toEqual({ type: Info.NAME, name: 'n' });
    expect(decodeInfoReply(Buffer.from([0, 42, 1]))).toEqual({ type: 'unknown', code: 42 });
  });

  it('refuses malformed handshake data', () => {
    refused(() => decodeOptionHeader(Buffer.alloc(16)), /not IHAVEOPT/);
    refused(() => decodeOptionReplyHeader(Buffer.alloc(20)), /option reply magic/);
    refused(() => decodeGo(Buffer.from([0, 0, 0, 10, 65])), /truncated/);
    refused(() => decodeGo(Buffer.concat([encodeGo({ exportName: 'a', infoRequests: [] }), Buffer.from([0])])), /1 bytes past its last field/);
    refused(() => decodeGo(Buffer.from([0, 0, 0, 1, 0, 0, 0])), /NUL/);
    refused(() => decodeMetaContextRequest(Buffer.from([0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 65])), /truncated/);
    refused(() => decodeMetaContextReply(Buffer.from([0, 0, 0, 1])), /needs an id and a name/);
    refused(() => decodeInfoReply(Buffer.from([0, 0, 1])), /NBD_INFO_EXPORT is 3 bytes; the spec says 12/);
    refused(() => decodeInfoReply(Buffer.from([0, 3, 0, 0, 0, 3, 0, 0, 16, 0, 0, 0, 16, 0])), /minimum block size 3/);
    refused(() => decodeInfoReply(Buffer.alloc(1)), /NBD_REP_INFO of 1 bytes/);
    const huge = Buffer.alloc(8);
    huge.writeBigUInt64BE(2n ** 60n);
    refused(() => readU64(huge, 0, 'the export size'), /beyond 2\^53/);
  });

  it("checks block sizes as the spec constrains them", () => {
    expect(() => checkBlockSizes({ minimum: 1, preferred: 4096, maximum: 0xffffffff })).not.toThrow();
    expect(() => checkBlockSizes({ minimum: 131072, preferred: 131072, maximum: 1 << 20 })).toThrow(/up to 65536/);
    expect(() => checkBlockSizes({ minimum: 512, preferred: 256, maximum: 1 << 20 })).toThrow(/preferred/);
    expect(() => checkBlockSizes({ minimum: 512, preferred: 4096, maximum: 1024 })).toThrow(/maximum payload/);
  });

  it('keeps strings within the spec (no NUL, at most 4096 bytes)', () => {
    expect(() => encodeString('a\0b', 'the export name')).toThrow(/NUL/);
    expect(() => encodeString('x'.repeat(4097), 'the export name')).toThrow(/4097 bytes/);
    expect(encodeString('é', 'x')).toEqual(Buffer.from([0xc3, 0xa9]));
  });
});

describe('NBD transmission codecs', () => {
  it('round-trips requests and chunk headers', () => {
    const req = { flags: 1, type: 1, cookie: 2n ** 63n + 5n, offset: 2 ** 50 + 7, length: 0xffffffff };
    expect(decodeRequest(encodeRequest(req))).toEqual({ ...req, offset: BigInt(req.offset) });
    refused(() => decodeRequest(Buffer.alloc(28)), /request magic is 0x0/);
    const [h, data] = encodeOffsetData(ReplyFlag.DONE, 9n, 4096, Buffer.from('xyz'));
    expect(decodeChunkHeader(h)).toEqual({ flags: ReplyFlag.DONE, type: ReplyType.OFFSET_DATA, cookie: 9n, length: 11 });
    expect(Number(h.readBigUInt64BE(20))).toBe(4096);
    expect(data.toString()).toBe('xyz');
  });

  it('round-trips block status and error chunks, and refuses malformed ones', () => {
    const bs = encodeBlockStatus(0, 1n, 3, [{ length: 512, flags: 1 }, { length: 1024, flags: 0xffffffff }]);
    expect(decodeBlockStatus(bs.subarray(20))).toEqual({ contextId: 3, extents: [{ length: 512, flags: 1 }, { length: 1024, flags: 0xffffffff }] });
    refused(() => decodeBlockStatus(Buffer.alloc(8)), /must be 4 \+ 8n/);
    refused(() => decodeBlockStatus(Buffer.alloc(13)), /must be 4 \+ 8n/);
    refused(() => decodeBlockStatus(Buffer.alloc(12)), /length 0/);
    const err = encodeErrorChunk(ReplyFlag.DONE, 1n, NbdErrno.EIO, 'disk on fire');
    expect(decodeErrorChunk(ReplyType.ERROR, err.subarray(20))).toEqual({ error: 5, message: 'disk on fire' });
    const long = encodeErrorChunk(0, 1n, NbdErrno.EIO, 'x'.repeat(10_000));
    expect(decodeErrorChunk(ReplyType.ERROR, long.subarray(20)).message).toHaveLength(4096);
    refused(() => decodeErrorChunk(ReplyType.ERROR, Buffer.alloc(5)), /at least 6/);
    const withOffset = Buffer.alloc(14);
    withOffset.writeUInt32BE(22, 0);
    withOffset.writeBigUInt64BE(777n, 6);
    expect(decodeErrorChunk(ReplyType.ERROR_OFFSET, withOffset)).toEqual({ error: 22, message: '', offset: 777 });
    refused(() => decodeErrorChunk(ReplyType.ERROR_OFFSET, withOffset.subarray(0, 10)), /does not fit/);
  });
});

describe('NBD names and errno mapping', () => {
  it('names options, replies, commands and errors, and says so for unknown ones', () => {
    expect(optionName(Option.SET_META_CONTEXT)).toBe('NBD_OPT_SET_META_CONTEXT');
    expect(repName(Rep.ERR_UNKNOWN)).toBe('NBD_REP_ERR_UNKNOWN');
    expect(repName(0x8000007f)).toBe('NBD_REP_(unknown 0x8000007f)');
    expect(cmdName(7)).toBe('NBD_CMD_BLOCK_STATUS');
    expect(errnoName(28)).toBe('NBD_ENOSPC');
    expect(errnoName(3)).toBe('NBD_(unknown 3)');
  });

  it('maps Node.js error codes to NBD errors as the spec says (EDQUOT, EFBIG are ENOSPC; the rest EIO)', () => {
    expect(['ENOSPC', 'EDQUOT', 'EFBIG'].map(errnoFromCode)).toEqual([28, 28, 28]);
    expect(['EPERM', 'EACCES', 'EROFS'].map(errnoFromCode)).toEqual([1, 1, 1]);
    expect(['EINVAL', 'ENOMEM', 'EOVERFLOW', 'ENOTSUP', 'ESHUTDOWN'].map(errnoFromCode)).toEqual([22, 12, 75, 95, 108]);
    expect([undefined, 'EIO', 'EBADF'].map(errnoFromCode)).toEqual([5, 5, 5]);
  });
});

describe('ByteReader', () => {
  it('reads exact lengths across chunk boundaries, into a target, and fails at the end', async () => {
    const s = new PassThrough();
    const r = new ByteReader(s, 16);
    s.write(Buffer.from('ab'));
    s.write(Buffer.from('cdefgh'));
    expect((await r.read(3)).toString()).toBe('abc');
    const target = Buffer.alloc(6, 0x2e);
    const into = r.readInto(target, 1, 4);
    s.write(Buffer.from('ij'));
    await into;
    expect(target.toString()).toBe('.defg.');
    await r.skip(2);
    s.end();
    expect((await r.read(1)).toString()).toBe('j');
    await expect(r.read(1)).rejects.toBeInstanceOf(NbdDisconnectedError);
  });

  it('pauses the stream while too much waits unread, and resumes as it is read', async () => {
    const s = new PassThrough();
    const r = new ByteReader(s, 1000);
    s.write(Buffer.alloc(1500));
    await new Promise((res) => setImmediate(res));
    expect(s.isPaused()).toBe(true);
    await r.read(1200);
    expect(s.isPaused()).toBe(false);
    expect(r.available).toBe(300);
  });
});
