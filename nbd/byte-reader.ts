// Exact-length reads from a byte stream, for a consumer that reads one field after another. Data
// bound for a caller's buffer (a READ reply's payload) is copied there straight from the socket's
// chunks, once. The stream is paused while more than `highWaterMark` bytes wait unread, so a peer
// that sends faster than Ferry consumes fills the kernel's buffers, not this process.
//
// Bytes come from the stream's 'data' events, or, for a socket made with `onread` (one reusable
// buffer instead of a new 64 KiB one per read: far less garbage at hundreds of MB/s), from feed().
import type { Readable } from 'node:stream';
import { NbdDisconnectedError } from './errors';

interface Pending {
  target: Buffer;
  at: number;
  remaining: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

export class ByteReader {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private pending: Pending | null = null;
  private ended: Error | null = null;
  private paused = false;

  constructor(
    private readonly stream: Readable,
    private readonly highWaterMark = 8 << 20,
    opts: { fed?: boolean } = {},
  ) {
    if (!opts.fed) stream.on('data', (chunk: Buffer) => this.push(chunk));
    stream.on('end', () => this.end(new NbdDisconnectedError('the peer closed the connection')));
    stream.on('close', () => this.end(new NbdDisconnectedError('the connection closed')));
    stream.on('error', (err) => this.end(new NbdDisconnectedError(`the connection failed: ${err.message}`)));
  }

  /** Bytes received and not read yet. */
  get available(): number {
    return this.buffered;
  }

  /** Exactly `n` bytes (a view of the received chunk when it holds them all, else a copy). */
  async read(n: number): Promise<Buffer> {
    const first = this.chunks[0];
    if (first && first.length >= n && !this.pending) {
      this.take(n);
      return first.subarray(0, n);
    }
    const target = Buffer.allocUnsafe(n);
    await this.readInto(target, 0, n);
    return target;
  }

  /** Copies exactly `n` bytes into `target` at `at`. */
  readInto(target: Buffer, at: number, n: number): Promise<void> {
    if (this.pending) return Promise.reject(new Error('ByteReader: one read at a time'));
    return new Promise<void>((resolve, reject) => {
      this.pending = { target, at, remaining: n, resolve, reject };
      this.fill();
    });
  }

  /** Reads and drops `n` bytes (an option's data the server does not understand). */
  async skip(n: number): Promise<void> {
    const scratch = Buffer.allocUnsafe(Math.min(n, 1 << 20));
    for (let left = n; left > 0; left -= scratch.length) await this.readInto(scratch, 0, Math.min(left, scratch.length));
  }

  /**
   * Bytes in a buffer that is only lent for this call (net's onread): what is not consumed at once
   * is copied. Returns false to pause the socket (onread's protocol).
   */
  feed(lent: Buffer): boolean {
    this.push(lent);
    const last = this.chunks.length - 1;
    if (last >= 0 && this.chunks[last].buffer === lent.buffer) this.chunks[last] = Buffer.from(this.chunks[last]);
    return !this.paused;
  }

  private push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.fill();
    if (this.buffered > this.highWaterMark && !this.paused) {
      this.paused = true;
      this.stream.pause();
    }
  }

  private fill(): void {
    const p = this.pending;
    if (!p) return;
    while (p.remaining > 0 && this.chunks.length > 0) {
      const c = this.chunks[0];
      const n = Math.min(c.length, p.remaining);
      c.copy(p.target, p.at, 0, n);
      p.at += n;
      p.remaining -= n;
      this.take(n);
    }
    if (p.remaining === 0) {
      this.pending = null;
      p.resolve();
    } else if (this.ended) {
      this.pending = null;
      p.reject(this.ended);
    }
  }

  /** Drops `n` bytes from the front (all within the first chunk). */
  private take(n: number): void {
    const c = this.chunks[0];
    if (n === c.length) this.chunks.shift();
    else this.chunks[0] = c.subarray(n);
    this.buffered -= n;
    if (this.paused && this.buffered <= this.highWaterMark / 2) {
      this.paused = false;
      this.stream.resume();
    }
  }

  private end(err: Error): void {
    this.ended ??= err;
    this.fill();
  }
}
