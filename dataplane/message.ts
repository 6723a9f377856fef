// Conversion between application messages and frame payloads, including zero-block detection.
import { DataPlaneError, type Message } from './api';
import { decodeMeta, encodeMeta, Flags, MAX_DATA_BYTES, MAX_META_BYTES, type Frame } from './frame';

export interface PreparedMessage {
  type: number;
  meta: Buffer;
  /** The caller's buffer (kept by reference until acknowledged), or empty for zero payloads. */
  data: Buffer;
  zero: boolean;
  /** Logical payload length (for zero payloads: the length of the zeros). */
  dataLength: number;
}

let zeros = Buffer.alloc(64 * 1024);

/** memcmp against a shared zero buffer: fast, and stops at the first non-zero byte. */
export function isAllZero(data: Buffer): boolean {
  if (data.length === 0) return false;
  if (data.length > zeros.length) zeros = Buffer.alloc(Math.min(MAX_DATA_BYTES, Math.max(data.length, zeros.length * 2)));
  return data.equals(zeros.subarray(0, data.length));
}

/** The buffer to pass to encodeFrame for a prepared message (a zero frame only needs the length). */
export function payloadOf(p: PreparedMessage): Buffer {
  return p.zero ? zeros.subarray(0, p.dataLength) : p.data;
}

export function prepareMessage(msg: Message, minType = 1): PreparedMessage {
  if (msg === null || typeof msg !== 'object') throw new DataPlaneError('bad_message', 'message must be an object');
  const { type, data } = msg;
  if (!Number.isInteger(type) || type < minType || type > 0xffff) {
    throw new DataPlaneError('bad_message', `message type must be an integer in ${minType}..65535, got ${type}`);
  }
  const payload = data ?? Buffer.alloc(0);
  if (!Buffer.isBuffer(payload)) throw new DataPlaneError('bad_message', 'message data must be a Buffer');
  if (payload.length > MAX_DATA_BYTES) throw new DataPlaneError('too_large', `message data of ${payload.length} bytes exceeds ${MAX_DATA_BYTES}`);
  let meta: Buffer;
  try {
    meta = encodeMeta(msg.meta);
  } catch (err) {
    throw new DataPlaneError('bad_message', `message meta is not JSON-serializable: ${(err as Error).message}`);
  }
  if (meta.length > MAX_META_BYTES) throw new DataPlaneError('too_large', `message meta of ${meta.length} bytes exceeds ${MAX_META_BYTES}`);
  const zero = isAllZero(payload);
  return { type, meta, data: zero ? Buffer.alloc(0) : payload, zero, dataLength: payload.length };
}

export function frameToMessage(f: Frame): Message {
  const msg: Message = { type: f.type, meta: decodeMeta(f.meta), data: f.data };
  if (f.flags & Flags.ZERO) msg.zero = true;
  return msg;
}
