// Frame encoding and an incremental decoder for the data-plane wire format (see PROTOCOL.md).
import { crc32 } from 'node:zlib';
import { DataPlaneError } from './api';

export const MAGIC = 0x46525931; // 'FRY1'
export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 40;
export const MAX_META_BYTES = 64 * 1024;
export const MAX_DATA_BYTES = 16 * 1024 * 1024;

export const FrameKind = {
  HELLO: 1,
  CHALLENGE: 2,
  AUTH: 3,
  WELCOME: 4,
  MSG: 5,
  REQUEST: 6,
  RESPONSE: 7,
  ACK: 8,
  PUSH: 9,
  ERROR: 10,
  PING: 11,
  PONG: 12,
  BYE: 13,
} as const;
export type FrameKind = (typeof FrameKind)[keyof typeof FrameKind];
const MAX_KIND = 13;

export const Flags = {
  /** The payload is all zero bytes: data length is the logical length, no data bytes follow. */
  ZERO: 0x0001,
} as const;
const KNOWN_FLAGS = Flags.ZERO;

const TWO_32 = 0x1_0000_0000;
const MAX_SEQ_HIGH = 0x1f_ffff; // keeps seq within Number.MAX_SAFE_INTEGER

export interface Frame {
  kind: FrameKind;
  flags: number;
  tag: number;
  seq: number;
  type: number;
  /** Raw meta bytes (JSON or empty); see decodeMeta. */
  meta: Buffer;
  /** Payload; for ZERO frames a fresh zero-filled buffer of the logical length. */
  data: Buffer;
}

export interface OutFrame {
  kind: FrameKind;
  tag: number;
  seq: number;
  type?: number;
  meta?: Buffer;
  /** For zero frames only the length matters; the bytes are not sent. */
  data?: Buffer;
  zero?: boolean;
}

const EMPTY = Buffer.alloc(0);

/** Raw header fields, written without validation (tests use it to build hostile frames). */
export interface HeaderFields {
  magic?: number;
  version?: number;
  kind: number;
  flags: number;
  tag: number;
  seq: number;
  type: number;
  reserved?: number;
  metaLength: number;
  dataLength: number;
}

export function writeHeader(buf: Buffer, h: HeaderFields): void {
  buf.writeUInt32BE(h.magic ?? MAGIC, 0);
  buf.writeUInt8(h.version ?? PROTOCOL_VERSION, 4);
  buf.writeUInt8(h.kind, 5);
  buf.writeUInt16BE(h.flags, 6);
  buf.writeUInt32BE(h.tag >>> 0, 8);
  buf.writeUInt32BE(Math.floor(h.seq / TWO_32), 12);
  buf.writeUInt32BE(h.seq >>> 0, 16);
  buf.writeUInt16BE(h.type, 20);
  buf.writeUInt16BE(h.reserved ?? 0, 22);
  buf.writeUInt32BE(h.metaLength, 24);
  buf.writeUInt32BE(h.dataLength, 28);
}

/** Computes and stores both checksums of a frame whose header (and meta) are in `head`. */
export function sealFrame(head: Buffer, data?: Buffer): void {
  let crc = crc32(head.subarray(0, 32));
  if (head.length > HEADER_BYTES) crc = crc32(head.subarray(HEADER_BYTES), crc);
  if (data && data.length > 0) crc = crc32(data, crc);
  head.writeUInt32BE(crc, 32);
  head.writeUInt32BE(crc32(head.subarray(0, 36)), 36);
}

/**
 * Encodes a frame as [header+meta] or [header+meta, data], so the (large) payload is never copied;
 * write both with cork/uncork.
 */
export function encodeFrame(f: OutFrame): Buffer[] {
  const meta = f.meta ?? EMPTY;
  const data = f.data ?? EMPTY;
  if (meta.length > MAX_META_BYTES) throw new DataPlaneError('too_large', `meta of ${meta.length} bytes exceeds ${MAX_META_BYTES}`);
  if (data.length > MAX_DATA_BYTES) throw new DataPlaneError('too_large', `data of ${data.length} bytes exceeds ${MAX_DATA_BYTES}`);
  const zero = f.zero === true && data.length > 0;
  const head = Buffer.allocUnsafe(HEADER_BYTES + meta.length);
  writeHeader(head, {
    kind: f.kind,
    flags: zero ? Flags.ZERO : 0,
    tag: f.tag,
    seq: f.seq,
    type: f.type ?? 0,
    metaLength: meta.length,
    dataLength: data.length,
  });
  meta.copy(head, HEADER_BYTES);
  if (zero || data.length === 0) {
    sealFrame(head);
    return [head];
  }
  sealFrame(head, data);
  return [head, data];
}

/** Bytes a frame occupies on the wire. */
export function wireLength(parts: Buffer[]): number {
  let n = 0;
  for (const p of parts) n += p.length;
  return n;
}

export function encodeMeta(meta: Record<string, unknown> | undefined): Buffer {
  if (!meta) return EMPTY;
  for (const _ in meta) return Buffer.from(JSON.stringify(meta));
  return EMPTY;
}

export function decodeMeta(buf: Buffer): Record<string, unknown> {
  if (buf.length === 0) return {};
  let v: unknown;
  try {
    v = JSON.parse(buf.toString('utf8'));
  } catch {
    throw new DataPlaneError('bad_meta', 'meta is not valid JSON');
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new DataPlaneError('bad_meta', 'meta is not a JSON object');
  return v as Record<string, unknown>;
}

interface ParsedHeader {
  kind: FrameKind;
  flags: number;
  tag: number;
  seq: number;
  type: number;
  metaLength: number;
  dataLength: number;
  crc: number;
  prefixCrc: number; // CRC-32 of bytes 0..31, the start of the frame checksum
}

export interface DecoderOptions {
  /** Frames must carry this tag (ERROR frames may carry 0). null = accept any tag. */
  expectedTag?: number | null;
  maxMetaBytes?: number;
  maxDataBytes?: number;
}

/**
 * Incremental decoder: feed it the TCP stream in chunks of any size; it returns whole, verified
 * frames. On bad input it throws a DataPlaneError and stays failed (the connection must be closed).
 * It never buffers more than one header plus the declared (limit-checked) body of one frame.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private header: ParsedHeader | null = null;
  private failure: DataPlaneError | null = null;
  private expectedTag: number | null;
  private maxMeta: number;
  private maxData: number;

  constructor(opts: DecoderOptions = {}) {
    this.expectedTag = opts.expectedTag ?? null;
    this.maxMeta = opts.maxMetaBytes ?? MAX_META_BYTES;
    this.maxData = opts.maxDataBytes ?? MAX_DATA_BYTES;
  }

  setExpectedTag(tag: number | null): void {
    this.expectedTag = tag;
  }

  setLimits(maxMetaBytes: number, maxDataBytes: number): void {
    this.maxMeta = Math.min(maxMetaBytes, MAX_META_BYTES);
    this.maxData = Math.min(maxDataBytes, MAX_DATA_BYTES);
  }

  /** Bytes received but not yet returned as frames. */
  get pendingBytes(): number {
    return this.buffered;
  }

  push(chunk: Buffer): Frame[] {
    if (this.failure) throw this.failure;
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: Frame[] = [];
    try {
      for (;;) {
        if (!this.header) {
          if (this.buffered >= 4 && this.peek(4).readUInt32BE(0) !== MAGIC) {
            throw new DataPlaneError('bad_magic', 'not a Ferry data-plane frame (bad magic)');
          }
          if (this.buffered < HEADER_BYTES) break;
          this.header = this.parseHeader(this.take(HEADER_BYTES));
        }
        const h = this.header;
        const zero = (h.flags & Flags.ZERO) !== 0;
        const bodyLength = h.metaLength + (zero ? 0 : h.dataLength);
        if (this.buffered < bodyLength) break;
        const body = bodyLength > 0 ? this.take(bodyLength) : EMPTY;
        this.header = null;
        let crc = h.prefixCrc;
        if (body.length > 0) crc = crc32(body, crc);
        if (crc !== h.crc) throw new DataPlaneError('bad_checksum', `frame checksum mismatch (kind ${h.kind}, seq ${h.seq})`);
        if (this.expectedTag !== null && h.tag !== this.expectedTag && !(h.kind === FrameKind.ERROR && h.tag === 0)) {
          throw new DataPlaneError('bad_tag', `frame belongs to another session (tag ${hex(h.tag)}, expected ${hex(this.expectedTag)})`);
        }
        out.push({
          kind: h.kind,
          flags: h.flags,
          tag: h.tag,
          seq: h.seq,
          type: h.type,
          meta: body.subarray(0, h.metaLength),
          data: zero ? Buffer.alloc(h.dataLength) : body.subarray(h.metaLength),
        });
      }
    } catch (err) {
      this.failure = err instanceof DataPlaneError ? err : new DataPlaneError('protocol', String(err));
      this.chunks = [];
      this.buffered = 0;
      throw this.failure;
    }
    return out;
  }

  private parseHeader(b: Buffer): ParsedHeader {
    // Magic and version first: they identify the format; only then can the header checksum be trusted.
    if (b.readUInt32BE(0) !== MAGIC) throw new DataPlaneError('bad_magic', 'not a Ferry data-plane frame (bad magic)');
    const version = b.readUInt8(4);
    if (version !== PROTOCOL_VERSION) throw new DataPlaneError('bad_version', `unsupported protocol version ${version} (this side speaks ${PROTOCOL_VERSION})`);
    // The header checksum is verified before any length is trusted, so a flipped length bit cannot
    // make us wait for (or allocate) a body that will never come.
    if (crc32(b.subarray(0, 36)) !== b.readUInt32BE(36)) throw new DataPlaneError('bad_checksum', 'frame header checksum mismatch');
    const kind = b.readUInt8(5);
    if (kind < 1 || kind > MAX_KIND) throw new DataPlaneError('bad_kind', `unknown frame kind ${kind}`);
    const flags = b.readUInt16BE(6);
    if ((flags & ~KNOWN_FLAGS) !== 0) throw new DataPlaneError('bad_flags', `unknown frame flags 0x${flags.toString(16)}`);
    const seqHigh = b.readUInt32BE(12);
    if (seqHigh > MAX_SEQ_HIGH) throw new DataPlaneError('bad_header', 'sequence number out of range');
    if (b.readUInt16BE(22) !== 0) throw new DataPlaneError('bad_header', 'reserved header field is not zero');
    const metaLength = b.readUInt32BE(24);
    const dataLength = b.readUInt32BE(28);
    if (metaLength > this.maxMeta) throw new DataPlaneError('too_large', `meta length ${metaLength} exceeds ${this.maxMeta}`);
    if (dataLength > this.maxData) throw new DataPlaneError('too_large', `data length ${dataLength} exceeds ${this.maxData}`);
    return {
      kind: kind as FrameKind,
      flags,
      tag: b.readUInt32BE(8),
      seq: seqHigh * TWO_32 + b.readUInt32BE(16),
      type: b.readUInt16BE(20),
      metaLength,
      dataLength,
      crc: b.readUInt32BE(32),
      prefixCrc: crc32(b.subarray(0, 32)),
    };
  }

  /** The first n buffered bytes, without consuming them. */
  private peek(n: number): Buffer {
    const first = this.chunks[0];
    if (first.length >= n) return first.subarray(0, n);
    return this.gather(n, false);
  }

  /** Consumes the first n buffered bytes; zero-copy when they lie in one chunk. */
  private take(n: number): Buffer {
    const first = this.chunks[0];
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    return this.gather(n, true);
  }

  private gather(n: number, consume: boolean): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    let i = 0;
    while (filled < n) {
      const c = this.chunks[i];
      const k = Math.min(c.length, n - filled);
      c.copy(out, filled, 0, k);
      filled += k;
      if (k < c.length) break;
      i++;
    }
    if (consume) {
      // One splice, not a shift per chunk: a stream of tiny chunks must not make this quadratic.
      let remaining = n;
      let whole = 0;
      while (whole < this.chunks.length && this.chunks[whole].length <= remaining) remaining -= this.chunks[whole++].length;
      this.chunks.splice(0, whole);
      if (remaining > 0) this.chunks[0] = this.chunks[0].subarray(remaining);
      this.buffered -= n;
    }
    return out;
  }
}

function hex(n: number): string {
  return '0x' + (n >>> 0).toString(16).padStart(8, '0');
}
