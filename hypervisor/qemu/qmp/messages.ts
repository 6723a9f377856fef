// QMP's wire messages (QEMU docs/interop/qmp-spec): the greeting, commands, success and error
// replies, and asynchronous events. Each message is one JSON object on one line.
import { QmpProtocolError } from './errors';

export interface QmpGreeting {
  QMP: {
    version: { qemu: { major: number; minor: number; micro: number }; package: string };
    capabilities: string[];
  };
}

export interface QmpCommand {
  execute: string;
  arguments?: Record<string, unknown>;
  id: string;
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export type QmpServerMessage =
  | { kind: 'return'; id: unknown; value: unknown }
  | { kind: 'error'; id: unknown; errorClass: string; desc: string }
  | { kind: 'event'; event: QmpEvent };

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** What a message from QEMU is; anything else is a protocol error. */
export function classify(value: unknown): QmpServerMessage {
  if (!isObject(value)) throw new QmpProtocolError(`QEMU sent a non-object QMP message: ${preview(value)}`);
  if ('return' in value) return { kind: 'return', id: value.id, value: value.return };
  if ('error' in value) {
    const e = value.error;
    if (!isObject(e) || typeof e.class !== 'string' || typeof e.desc !== 'string') throw new QmpProtocolError(`QEMU sent a malformed QMP error: ${preview(value)}`);
    return { kind: 'error', id: value.id, errorClass: e.class, desc: e.desc };
  }
  if (typeof value.event === 'string') {
    const data = value.data === undefined ? {} : value.data;
    const ts = value.timestamp;
    if (!isObject(data) || !isObject(ts) || typeof ts.seconds !== 'number' || typeof ts.microseconds !== 'number') throw new QmpProtocolError(`QEMU sent a malformed QMP event: ${preview(value)}`);
    return { kind: 'event', event: { event: value.event, data, timestamp: { seconds: ts.seconds, microseconds: ts.microseconds } } };
  }
  throw new QmpProtocolError(`QEMU sent a QMP message that is neither a reply nor an event: ${preview(value)}`);
}

export function parseGreeting(value: unknown): QmpGreeting {
  const qmp = isObject(value) ? value.QMP : undefined;
  const version = isObject(qmp) ? qmp.version : undefined;
  const qemu = isObject(version) ? version.qemu : undefined;
  if (!isObject(qmp) || !isObject(version) || !isObject(qemu) || !Array.isArray(qmp.capabilities)) {
    throw new QmpProtocolError(`the peer's first message is not a QMP greeting: ${preview(value)}`);
  }
  return value as unknown as QmpGreeting;
}

export function preview(value: unknown, max = 200): string {
  const s = typeof value === 'string' ? value : JSON.stringify(value) ?? String(value);
  return s.length > max ? `${s.slice(0, max)}...` : s;
}
