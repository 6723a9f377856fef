// Constants and codecs of the NBD protocol (NetworkBlockDevice/nbd, doc/proto.md): fixed newstyle
// handshake, simple and structured replies, metadata contexts. Everything is big-endian. Codecs here
// only build and check bytes; the client and server own the byte streams.
import { NbdProtocolError } from './errors';

export const NBDMAGIC = 0x4e42444d41474943n; // 'NBDMAGIC'
export const IHAVEOPT = 0x49484156454f5054n; // 'IHAVEOPT'
export const CLISERV_MAGIC = 0x00420281861253n; // oldstyle negotiation
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x80000000;
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
  ERR_EXT_HEADER_REQD: REP_ERR + 10,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const Cmd = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export type CmdType = (typeof Cmd)[keyof typeof Cmd];

export const CmdFlag = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4, PAYLOAD_LEN: 1 << 5 } as const;

export const ReplyFlag = { DONE: 1 << 0 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;
/** Error chunk types have bit 15 set. */
export const isErrorChunk = (type: number): boolean => (type & 0x8000) !== 0;

export const NbdErrno = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

/** `base:allocation` flags. */
export const State = { HOLE: 1 << 0, ZERO: 1 << 1 } as const;
/** `qemu:dirty-bitmap:NAME` flag: the extent is dirty. */
export const DIRTY = 1 << 0;
export const BASE_ALLOCATION = 'base:allocation';

/** Strings (export names, messages, context names) MUST be no longer than this. */
export const MAX_STRING_BYTES = 4096;
/** The payload every server should take, and the most a client should send when not told otherwise. */
export const DEFAULT_MAX_PAYLOAD = 32 << 20;
export const REQUEST_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const STRUCTURED_HEADER_BYTES = 20;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_HEADER_BYTES = 20;

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface Extent {
  offset: number;
  length: number;
  flags: number;
}

// ---- names, for errors that say what happened ----

const nameOf = (table: Record<string, number>, prefix: string) => {
  const names = new Map(Object.entries(table).map(([k, v]) => [v, `${prefix}${k}`]));
  return (value: number): string => names.get(value) ?? `${prefix}(unknown ${value >>> 0 > 0xffff ? '0x' + (value >>> 0).toString(16) : value})`;
};
export const optionName = nameOf(Option, 'NBD_OPT_');
export const repName = nameOf(Rep, 'NBD_REP_');
export const cmdName = nameOf(Cmd, 'NBD_CMD_');
export const replyTypeName = nameOf(ReplyType, 'NBD_REPLY_TYPE_');
export const errnoName = nameOf(NbdErrno, 'NBD_');

/** NBD error values from a Node.js error code (the spec's mapping: EDQUOT and EFBIG are ENOSPC). */
export function errnoFromCode(code: string | undefined): number {
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return NbdErrno.EPERM;
    case 'ENOMEM':
      return NbdErrno.ENOMEM;
    case 'EINVAL':
    case 'ERANGE':
      return NbdErrno.EINVAL;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NbdErrno.ENOSPC;
    case 'EOVERFLOW':
      return NbdErrno.EOVERFLOW;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return NbdErrno.ENOTSUP;
    case 'ESHUTDOWN':
      return NbdErrno.ESHUTDOWN;
    default:
      return NbdErrno.EIO;
  }
}

// ---- helpers ----

/** A u64 that must fit a JS number (offsets and sizes of real disks do). */
export function readU64(buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdProtocolError(`${what} ${v} is beyond 2^53`);
  return Number(v);
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** A string of the protocol: UTF-8, no NUL, at most 4096 bytes. */
export function encodeString(s: string, what: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length > MAX_STRING_BYTES) throw new RangeError(`${what} is ${b.length} bytes; NBD strings are at most ${MAX_STRING_BYTES}`);
  if (b.includes(0)) throw new RangeError(`${what} contains a NUL character, which NBD strings must not`);
  return b;
}

function decodeString(b: Buffer, what: string): string {
  if (b.length > MAX_STRING_BYTES) throw new NbdProtocolError(`${what} is ${b.length} bytes; NBD strings are at most ${MAX_STRING_BYTES}`);
  if (b.includes(0)) throw new NbdProtocolError(`${what} contains a NUL character`);
  return b.toString('utf8');
}

/** Reads length-prefixed fields from an option's data, failing with `invalid` past the end. */
class FieldReader {
  private at = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly what: string,
  ) {}
  private need(n: number): void {
    if (this.at + n > this.buf.length) throw new NbdProtocolError(`${this.what} is truncated (needs ${this.at + n} bytes, has ${this.buf.length})`);
  }
  u16(): number {
    this.need(2);
    this.at += 2;
    return this.buf.readUInt16BE(this.at - 2);
  }
  u32(): number {
    this.need(4);
    this.at += 4;
    return this.buf.readUInt32BE(this.at - 4);
  }
  bytes(n: number): Buffer {
    this.need(n);
    this.at += n;
    return this.buf.subarray(this.at - n, this.at);
  }
  string(n: number, what: string): string {
    return decodeString(this.bytes(n), what);
  }
  end(): void {
    if (this.at !== this.buf.length) throw new NbdProtocolError(`${this.what} has ${this.buf.length - this.at} bytes past its last field`);
  }
}

// ---- handshake ----

export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(OPTION_HEADER_BYTES);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

export interface OptionHeader {
  option: number;
  length: number;
}

export function decodeOptionHeader(h: Buffer): OptionHeader {
  if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new NbdProtocolError(`option magic is 0x${h.readBigUInt64BE(0).toString(16)}, not IHAVEOPT`);
  return { option: h.readUInt32BE(8), length: h.readUInt32BE(12) };
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(OPTION_REPLY_HEADER_BYTES);
  h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(h: Buffer): OptionReplyHeader {
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdProtocolError(`option reply magic is 0x${h.readBigUInt64BE(0).toString(16)}, not 0x3e889045565a9`);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), length: h.readUInt32BE(16) };
}

/** The data of NBD_OPT_INFO and NBD_OPT_GO. */
export interface GoRequest {
  exportName: string;
  infoRequests: number[];
}

export function encodeGo(req: GoRequest): Buffer {
  const name = encodeString(req.exportName, 'the export name');
  const b = Buffer.alloc(4 + name.length + 2 + 2 * req.infoRequests.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  b.writeUInt16BE(req.infoRequests.length, 4 + name.length);
  req.infoRequests.forEach((info, i) => b.writeUInt16BE(info, 6 + name.length + 2 * i));
  return b;
}

export function decodeGo(data: Buffer): GoRequest {
  const r = new FieldReader(data, 'NBD_OPT_GO/INFO data');
  const exportName = r.string(r.u32(), 'the export name');
  const n = r.u16();
  const infoRequests: number[] = [];
  for (let i = 0; i < n; i++) infoRequests.push(r.u16());
  r.end();
  return { exportName, infoRequests };
}

/** The data of NBD_OPT_SET_META_CONTEXT and NBD_OPT_LIST_META_CONTEXT. */
export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const name = encodeString(req.exportName, 'the export name');
  const queries = req.queries.map((q) => encodeString(q, `meta context query ${q}`));
  const parts: Buffer[] = [u32(name.length), name, u32(queries.length)];
  for (const q of queries) parts.push(u32(q.length), q);
  return Buffer.concat(parts);
}

export function decodeMetaContextRequest(data: Buffer): MetaContextRequest {
  const r = new FieldReader(data, 'meta context option data');
  const exportName = r.string(r.u32(), 'the export name');
  const n = r.u32();
  const queries: string[] = [];
  for (let i = 0; i < n; i++) queries.push(r.string(r.u32(), 'a meta context query'));
  r.end();
  return { exportName, queries };
}

export function encodeMetaContextReply(id: number, name: string): Buffer {
  return Buffer.concat([u32(id), encodeString(name, 'the meta context name')]);
}

export function decodeMetaContextReply(data: Buffer): { id: number; name: string } {
  if (data.length < 5) throw new NbdProtocolError(`NBD_REP_META_CONTEXT of ${data.length} bytes (needs an id and a name)`);
  return { id: data.readUInt32BE(0), name: decodeString(data.subarray(4), 'the meta context name') };
}

export function encodeServerReply(name: string, description = ''): Buffer {
  const n = encodeString(name, 'the export name');
  return Buffer.concat([u32(n.length), n, encodeString(description, 'the export description')]);
}

export function decodeServerReply(data: Buffer): { name: string; description: string } {
  const r = new FieldReader(data, 'NBD_REP_SERVER');
  const name = r.string(r.u32(), 'the export name');
  return { name, description: decodeString(data.subarray(4 + Buffer.byteLength(name)), 'the export description') };
}

export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoBlockSize(s: BlockSizes): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(s.minimum, 2);
  b.writeUInt32BE(s.preferred, 6);
  b.writeUInt32BE(s.maximum, 10);
  return b;
}

export function encodeInfoString(type: typeof Info.NAME | typeof Info.DESCRIPTION, s: string): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(type, 0);
  return Buffer.concat([b, encodeString(s, type === Info.NAME ? 'the export name' : 'the export description')]);
}

export type InfoReply =
  | { type: typeof Info.EXPORT; size: number; flags: number }
  | { type: typeof Info.NAME; name: string }
  | { type: typeof Info.DESCRIPTION; description: string }
  | { type: typeof Info.BLOCK_SIZE; sizes: BlockSizes }
  | { type: 'unknown'; code: number };

export function decodeInfoReply(data: Buffer): InfoReply {
  if (data.length < 2) throw new NbdProtocolError(`NBD_REP_INFO of ${data.length} bytes`);
  const type = data.readUInt16BE(0);
  const want = (n: number, what: string) => {
    if (data.length !== n) throw new NbdProtocolError(`${what} is ${data.length} bytes; the spec says ${n}`);
  };
  switch (type) {
    case Info.EXPORT:
      want(12, 'NBD_INFO_EXPORT');
      return { type, size: readU64(data, 2, 'the export size'), flags: data.readUInt16BE(10) };
    case Info.NAME:
      return { type, name: decodeString(data.subarray(2), 'NBD_INFO_NAME') };
    case Info.DESCRIPTION:
      return { type, description: decodeString(data.subarray(2), 'NBD_INFO_DESCRIPTION') };
    case Info.BLOCK_SIZE: {
      want(14, 'NBD_INFO_BLOCK_SIZE');
      const sizes = { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
      checkBlockSizes(sizes);
      return { type, sizes };
    }
    default:
      return { type: 'unknown', code: type };
  }
}

const isPowerOf2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;

/** The spec's constraints on advertised block sizes ("Size constraints"). */
export function checkBlockSizes(s: BlockSizes): void {
  if (!isPowerOf2(s.minimum) || s.minimum > 65536) throw new NbdProtocolError(`minimum block size ${s.minimum} is not a power of 2 up to 65536`);
  if (!isPowerOf2(s.preferred) || s.preferred < Math.max(s.minimum, 512)) throw new NbdProtocolError(`preferred block size ${s.preferred} is not a power of 2 of at least max(minimum, 512)`);
  if (s.maximum < s.preferred) throw new NbdProtocolError(`maximum payload ${s.maximum} is below the preferred block size ${s.preferred}`);
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags and (unless NO_ZEROES) 124 zero bytes. */
export function encodeExportNameReply(size: number, flags: number, zeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (zeroes ? 124 : 0));
  writeU64(b, size, 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

// ---- transmission ----

export interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

export function encodeRequest(r: Request): Buffer {
  const b = Buffer.alloc(REQUEST_BYTES);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  writeU64(b, r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

/** A request header; the offset is a bigint, since a peer may send any u64 and the server answers EINVAL. */
export interface RawRequest {
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: number;
}

export function decodeRequest(h: Buffer): RawRequest {
  const magic = h.readUInt32BE(0);
  if (magic !== REQUEST_MAGIC) throw new NbdProtocolError(`request magic is 0x${magic.toString(16)}, not 0x25609513`);
  return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), offset: h.readBigUInt64BE(16), length: h.readUInt32BE(24) };
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_BYTES);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

export function encodeChunkHeader(flags: number, type: number, cookie: bigint, length: number): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_BYTES);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** An OFFSET_DATA chunk as two buffers (header with offset, then the data as it is: no copy). */
export function encodeOffsetData(flags: number, cookie: bigint, offset: number, data: Buffer): [Buffer, Buffer] {
  const h = Buffer.alloc(STRUCTURED_HEADER_BYTES + 8);
  encodeChunkHeader(flags, ReplyType.OFFSET_DATA, cookie, 8 + data.length).copy(h);
  writeU64(h, offset, STRUCTURED_HEADER_BYTES);
  return [h, data];
}

export function encodeOffsetHole(flags: number, cookie: bigint, offset: number, length: number): Buffer {
  const p = Buffer.alloc(12);
  writeU64(p, offset, 0);
  p.writeUInt32BE(length, 8);
  return Buffer.concat([encodeChunkHeader(flags, ReplyType.OFFSET_HOLE, cookie, 12), p]);
}

export function encodeBlockStatus(flags: number, cookie: bigint, contextId: number, extents: { length: number; flags: number }[]): Buffer {
  const p = Buffer.alloc(4 + 8 * extents.length);
  p.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    p.writeUInt32BE(e.length, 4 + 8 * i);
    p.writeUInt32BE(e.flags >>> 0, 8 + 8 * i);
  });
  return Buffer.concat([encodeChunkHeader(flags, ReplyType.BLOCK_STATUS, cookie, p.length), p]);
}

export function encodeErrorChunk(flags: number, cookie: bigint, error: number, message: string): Buffer {
  // Messages are for people; cut rather than fail when one is too long for the protocol.
  let m = Buffer.from(message.replace(/\0/g, ' '), 'utf8');
  if (m.length > MAX_STRING_BYTES) m = m.subarray(0, MAX_STRING_BYTES);
  const p = Buffer.alloc(6);
  p.writeUInt32BE(error, 0);
  p.writeUInt16BE(m.length, 4);
  return Buffer.concat([encodeChunkHeader(flags, ReplyType.ERROR, cookie, 6 + m.length), p, m]);
}

export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

export function decodeChunkHeader(h: Buffer): ChunkHeader {
  return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), length: h.readUInt32BE(16) };
}

export interface ErrorChunk {
  error: number;
  message: string;
  offset?: number;
}

/** The payload of any error chunk (bit 15): error, message, and for ERROR_OFFSET the offset. */
export function decodeErrorChunk(type: number, p: Buffer): ErrorChunk {
  if (p.length < 6) throw new NbdProtocolError(`${replyTypeName(type)} payload of ${p.length} bytes (at least 6)`);
  const error = p.readUInt32BE(0);
  const len = p.readUInt16BE(4);
  const fixed = type === ReplyType.ERROR_OFFSET ? 14 : 6;
  if (len > p.length - fixed) throw new NbdProtocolError(`${replyTypeName(type)} message length ${len} does not fit its ${p.length}-byte payload`);
  const message = p.subarray(6, 6 + len).toString('utf8');
  if (type === ReplyType.ERROR_OFFSET) return { error, message, offset: readU64(p, 6 + len, 'the error offset') };
  return { error, message };
}

/** The payload of a BLOCK_STATUS chunk: context id and descriptors. */
export function decodeBlockStatus(p: Buffer): { contextId: number; extents: { length: number; flags: number }[] } {
  if (p.length < 12 || (p.length - 4) % 8 !== 0) throw new NbdProtocolError(`NBD_REPLY_TYPE_BLOCK_STATUS payload of ${p.length} bytes (must be 4 + 8n, n >= 1)`);
  const extents: { length: number; flags: number }[] = [];
  for (let at = 4; at < p.length; at += 8) {
    const length = p.readUInt32BE(at);
    if (length === 0) throw new NbdProtocolError('a block status descriptor has length 0');
    extents.push({ length, flags: p.readUInt32BE(at + 4) });
  }
  return { contextId: p.readUInt32BE(0), extents };
}
