// A data-plane peer that speaks the wire format by hand, for tests of peers that misbehave on purpose.
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import type { SessionIdentity } from '../../dataplane/api';
import { computeProof, sessionTag } from '../../dataplane/auth';
import { decodeMeta, encodeFrame, encodeMeta, FrameDecoder, FrameKind, PROTOCOL_VERSION } from '../../dataplane/frame';

export interface PeerFrame {
  kind: number;
  seq: number;
  meta: Record<string, unknown>;
}

export class RawPeer {
  readonly socket: net.Socket;
  readonly frames: PeerFrame[] = [];
  private readonly decoder = new FrameDecoder({ maxMetaBytes: 65536, maxDataBytes: 1 << 20 });
  private waiters: (() => void)[] = [];
  closed = false;

  constructor(port: number, host = '127.0.0.1') {
    this.socket = net.connect(port, host);
    this.socket.on('data', (chunk) => {
      for (const f of this.decoder.push(chunk)) this.frames.push({ kind: f.kind, seq: f.seq, meta: decodeMeta(f.meta) });
      this.waiters.splice(0).forEach((w) => w());
    });
    this.socket.on('error', () => undefined);
    this.socket.on('close', () => {
      this.closed = true;
      this.waiters.splice(0).forEach((w) => w());
    });
  }

  /** Connects to "host:port". */
  static to(address: string): RawPeer {
    const sep = address.lastIndexOf(':');
    return new RawPeer(Number(address.slice(sep + 1)), address.slice(0, sep));
  }

  sendRaw(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  send(kind: FrameKind, tag: number, seq: number, meta: Record<string, unknown>, data?: Buffer, type = kind === FrameKind.MSG ? 1 : 0): void {
    for (const p of encodeFrame({ kind, tag, seq, type, meta: encodeMeta(meta), data })) this.socket.write(p);
  }

  async next(kind: number): Promise<PeerFrame> {
    for (;;) {
      const f = this.frames.find((x) => x.kind === kind);
      if (f) return f;
      if (this.closed) throw new Error(`connection closed before frame kind ${kind}`);
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  async waitClosed(): Promise<void> {
    while (!this.closed) await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  /**
   * HELLO, then (if the server answers with a CHALLENGE) an AUTH proving `secret`. Resolves with the
   * server's last answer: WELCOME, or the ERROR that refused the session.
   */
  async handshake(identity: SessionIdentity, secret: Buffer, sessionId = `raw-${randomBytes(6).toString('hex')}`): Promise<PeerFrame> {
    const clientNonce = randomBytes(32).toString('hex');
    const tag = sessionTag(identity);
    this.send(FrameKind.HELLO, tag, 0, { version: PROTOCOL_VERSION, identity, clientNonce, sessionId, lastAckedSeq: 0 });
    const first = await this.nextOf([FrameKind.CHALLENGE, FrameKind.ERROR]);
    if (first.kind === FrameKind.ERROR) return first;
    const proof = computeProof(secret, 'ferry-client', clientNonce, first.meta.serverNonce as string, sessionId, identity);
    this.send(FrameKind.AUTH, tag, 0, { proof: proof.toString('hex') });
    return this.nextOf([FrameKind.WELCOME, FrameKind.ERROR]);
  }

  private async nextOf(kinds: number[]): Promise<PeerFrame> {
    for (;;) {
      const f = this.frames.find((x) => kinds.includes(x.kind));
      if (f) return f;
      if (this.closed) throw new Error(`connection closed before frame kind ${kinds.join(' or ')}`);
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  destroy(): void {
    this.socket.destroy();
  }
}
