// Session tags, nonces, HMAC proofs and validation of handshake payloads.
import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { DataPlaneError, type SessionIdentity } from './api';

export const NONCE_BYTES = 32;
/** Names in a session identity: they end up in file names on the receiving host, so no '/' and no leading '.'. */
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$/;

/**
 * A 32-bit tag on every frame, derived from the session identity. It is not a security measure (the
 * HMAC handshake is): it stops a frame of another migration, epoch or stream from being applied.
 */
export function sessionTag(id: SessionIdentity): number {
  const h = createHash('sha256').update(JSON.stringify(['ferry-tag', id.migrationId, id.epoch, id.vmId, id.stream])).digest();
  return h.readUInt32BE(0);
}

export function newNonce(): string {
  return randomBytes(NONCE_BYTES).toString('hex');
}

export function newSessionId(): string {
  return randomBytes(16).toString('hex');
}

export type ProofRole = 'ferry-server' | 'ferry-client';

export function computeProof(
  secret: Buffer,
  role: ProofRole,
  clientNonce: string,
  serverNonce: string,
  sessionId: string,
  id: SessionIdentity,
): Buffer {
  const input = JSON.stringify([role, clientNonce, serverNonce, sessionId, id.migrationId, id.epoch, id.vmId, id.stream]);
  return createHmac('sha256', secret).update(input).digest();
}

/** Constant-time comparison of an expected proof with the hex string the peer sent. */
export function proofMatches(expected: Buffer, received: unknown): boolean {
  if (typeof received !== 'string' || received.length !== expected.length * 2 || !/^[0-9a-f]+$/.test(received)) return false;
  return timingSafeEqual(expected, Buffer.from(received, 'hex'));
}

function protocolError(message: string): DataPlaneError {
  return new DataPlaneError('protocol', message);
}

function name(v: unknown, field: string): string {
  if (typeof v !== 'string' || !NAME.test(v)) throw protocolError(`invalid ${field}: use 1-256 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit`);
  return v;
}

function count(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw protocolError(`invalid ${field}`);
  return v;
}

export function checkIdentity(v: unknown): SessionIdentity {
  if (v === null || typeof v !== 'object') throw protocolError('missing identity');
  const o = v as Record<string, unknown>;
  return {
    migrationId: name(o.migrationId, 'migrationId'),
    epoch: count(o.epoch, 'epoch'),
    vmId: name(o.vmId, 'vmId'),
    stream: name(o.stream, 'stream'),
  };
}

export function sameIdentity(a: SessionIdentity, b: SessionIdentity): boolean {
  return a.migrationId === b.migrationId && a.epoch === b.epoch && a.vmId === b.vmId && a.stream === b.stream;
}

export interface Hello {
  version: number;
  identity: SessionIdentity;
  clientNonce: string;
  sessionId: string;
  lastAckedSeq: number;
  /** The client's in-flight window, a hint for how often to acknowledge. */
  windowBytes?: number;
  /** The client's keepalive interval: it sends something at least this often. */
  keepaliveMs?: number;
}

function nonce(v: unknown, field: string): string {
  if (typeof v !== 'string' || v.length !== NONCE_BYTES * 2 || !/^[0-9a-f]+$/.test(v)) throw protocolError(`invalid ${field}`);
  return v;
}

export function parseHello(meta: Record<string, unknown>): Hello {
  const sessionId = meta.sessionId;
  if (typeof sessionId !== 'string' || !/^[0-9A-Za-z_-]{8,128}$/.test(sessionId)) throw protocolError('invalid sessionId');
  return {
    version: count(meta.version, 'version'),
    identity: checkIdentity(meta.identity),
    clientNonce: nonce(meta.clientNonce, 'clientNonce'),
    sessionId,
    lastAckedSeq: count(meta.lastAckedSeq, 'lastAckedSeq'),
    windowBytes: meta.windowBytes === undefined ? undefined : count(meta.windowBytes, 'windowBytes'),
    keepaliveMs: meta.keepaliveMs === undefined ? undefined : count(meta.keepaliveMs, 'keepaliveMs'),
  };
}

export function parseChallenge(meta: Record<string, unknown>): { serverNonce: string; proof: unknown } {
  return { serverNonce: nonce(meta.serverNonce, 'serverNonce'), proof: meta.proof };
}

export function parseWelcome(meta: Record<string, unknown>): { resumeSeq: number } {
  return { resumeSeq: count(meta.resumeSeq, 'resumeSeq') };
}

export function parseError(meta: Record<string, unknown>): DataPlaneError {
  const code = typeof meta.code === 'string' && meta.code.length <= 64 ? meta.code : 'protocol';
  const message = typeof meta.message === 'string' ? meta.message.slice(0, 4096) : 'peer reported an error';
  return new DataPlaneError(code, message);
}

export function checkSecret(secret: unknown): Buffer {
  if (!Buffer.isBuffer(secret) || secret.length === 0) throw new DataPlaneError('bad_config', 'the data-plane secret must be a non-empty Buffer');
  return secret;
}
