// A TCP proxy in front of a host's data plane: the host advertises the proxy's address, so every
// source reaches it through here. The harness can cut every connection (and refuse new ones for a
// while, as a link that is down) or flip one byte in the body of the next message frame a source
// sends, which the receiver must catch by its frame CRC (dataplane/PROTOCOL.md).
import net from 'node:net';
import { Flags, FrameKind, HEADER_BYTES } from '../dataplane/frame';

export class DataPlaneProxy {
  private readonly sockets = new Set<net.Socket>();
  private downUntil = 0;
  private corruptArmed = false;
  /** Frames corrupted since the start. */
  corrupted = 0;
  /** Connections cut since the start. */
  cuts = 0;

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
    private readonly target: () => number | null,
  ) {}

  /** Listen on a free loopback port; `target` gives the port of the real data plane (it changes when an agent restarts). */
  static async start(target: () => number | null): Promise<DataPlaneProxy> {
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const proxy = new DataPlaneProxy(server, (server.address() as net.AddressInfo).port, target);
    server.on('connection', (client) => proxy.onConnection(client));
    return proxy;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Drop every open connection; refuse new ones for `downMs`. */
  cut(downMs = 0): number {
    this.downUntil = Date.now() + downMs;
    const n = this.sockets.size;
    for (const s of this.sockets) s.destroy();
    this.cuts++;
    return n;
  }

  /** Flip one byte in the body of the next MSG or REQUEST frame from a source. */
  corruptNextFrame(): void {
    this.corruptArmed = true;
  }

  get corruptPending(): boolean {
    return this.corruptArmed;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private onConnection(client: net.Socket): void {
    const port = this.target();
    if (Date.now() < this.downUntil || port === null) {
      client.destroy();
      return;
    }
    const upstream = net.connect(port, '127.0.0.1');
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => {
        this.sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    const frames = new FrameCursor();
    client.on('data', (chunk: Buffer) => {
      if (this.corruptArmed && frames.flipInNextMessage(chunk)) {
        this.corruptArmed = false;
        this.corrupted++;
      } else {
        frames.advance(chunk);
      }
      upstream.write(chunk);
    });
    upstream.pipe(client);
  }
}

/** Follows frame boundaries in one direction of a connection, to find the body of a message frame. */
class FrameCursor {
  private header = Buffer.alloc(0);
  /** Body bytes of the current frame still to come. */
  private bodyLeft = 0;
  private bodyIsMessage = false;

  advance(chunk: Buffer): void {
    this.walk(chunk, false);
  }

  /** Advance over `chunk`, flipping the first body byte of a MSG/REQUEST frame found in it. */
  flipInNextMessage(chunk: Buffer): boolean {
    return this.walk(chunk, true);
  }

  private walk(chunk: Buffer, flip: boolean): boolean {
    let flipped = false;
    let i = 0;
    while (i < chunk.length) {
      if (this.bodyLeft > 0) {
        const n = Math.min(this.bodyLeft, chunk.length - i);
        if (flip && !flipped && this.bodyIsMessage) {
          chunk[i] ^= 0x5a;
          flipped = true;
        }
        this.bodyLeft -= n;
        i += n;
        continue;
      }
      const need = HEADER_BYTES - this.header.length;
      const take = chunk.subarray(i, i + need);
      this.header = Buffer.concat([this.header, take]);
      i += take.length;
      if (this.header.length === HEADER_BYTES) {
        const kind = this.header[5];
        const flags = this.header.readUInt16BE(6);
        const meta = this.header.readUInt32BE(24);
        const data = flags & Flags.ZERO ? 0 : this.header.readUInt32BE(28);
        this.bodyLeft = meta + data;
        this.bodyIsMessage = kind === FrameKind.MSG || kind === FrameKind.REQUEST;
        this.header = Buffer.alloc(0);
      }
    }
    return flipped;
  }
}
