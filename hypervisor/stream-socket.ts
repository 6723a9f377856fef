// The agent's ends of a machine-state stream: a Unix socket the source hypervisor connects to (the
// agent reads what it writes), and a connection to the socket an incoming hypervisor listens on (the
// agent writes into it). Both drivers use these; the bytes are the hypervisor's own format.
import * as net from 'node:net';
import { once } from 'node:events';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';

/** A short socket path (Unix socket paths are limited to ~108 bytes). */
export async function streamSocketPath(tag: string): Promise<string> {
  const dir = path.join(os.tmpdir(), 'ferry-streams');
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const name = createHash('sha256').update(tag).update(randomBytes(8)).digest('hex').slice(0, 16);
  return path.join(dir, `${name}.sock`);
}

export interface StreamListener {
  readonly path: string;
  /** The hypervisor's connection, read with backpressure. */
  accepted(timeoutMs: number): Promise<net.Socket>;
  close(): Promise<void>;
}

/** Listens for the one connection of an outgoing stream. */
export async function listenForStream(tag: string): Promise<StreamListener> {
  const file = await streamSocketPath(tag);
  const server = net.createServer({ pauseOnConnect: true });
  let socket: net.Socket | null = null;
  const connection = new Promise<net.Socket>((resolve) => {
    server.once('connection', (s) => {
      socket = s;
      server.close();
      resolve(s);
    });
  });
  server.listen(file);
  await once(server, 'listening');
  return {
    path: file,
    async accepted(timeoutMs) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`the hypervisor did not connect to ${file} within ${timeoutMs} ms`)), timeoutMs);
      });
      try {
        return await Promise.race([connection, timeout]);
      } finally {
        clearTimeout(timer);
      }
    },
    async close() {
      (socket as net.Socket | null)?.destroy();
      server.close();
      await fs.rm(file, { force: true });
    },
  };
}

/**
 * The socket's data as chunks of up to `maxBytes` (what is there is joined, so a fast hypervisor makes
 * few large messages), pulled by the consumer: a slow data plane holds the hypervisor back.
 */
export async function* socketChunks(socket: net.Socket, maxBytes = 1 << 20): AsyncGenerator<Buffer> {
  let ended = false;
  let failure: Error | null = null;
  let wake: (() => void) | null = null;
  const poke = (): void => {
    wake?.();
    wake = null;
  };
  socket.on('readable', poke);
  socket.once('end', () => ((ended = true), poke()));
  socket.once('error', (err) => ((failure = err), poke()));
  socket.once('close', () => ((ended = true), poke()));
  for (;;) {
    const parts: Buffer[] = [];
    let size = 0;
    let chunk: Buffer | null;
    while (size < maxBytes && (chunk = socket.read() as Buffer | null) !== null) {
      parts.push(chunk);
      size += chunk.length;
    }
    if (size > 0) {
      yield parts.length === 1 ? parts[0] : Buffer.concat(parts);
      continue;
    }
    if (failure) throw failure;
    if (ended) return;
    await new Promise<void>((resolve) => (wake = resolve));
  }
}

/** Connects to the socket an incoming hypervisor listens on, retrying while it is not there yet. */
export async function connectToStream(file: string, timeoutMs: number): Promise<StreamWriter> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const socket = net.connect(file);
      await once(socket, 'connect');
      // The hypervisor takes one connection: its socket's name has served (it would stay behind otherwise).
      await fs.rm(file, { force: true });
      return new StreamWriter(socket);
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`cannot connect to the incoming stream socket ${file}: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** Writes chunks in order, each resolved once the socket took it (backpressure). */
export class StreamWriter {
  private error: Error | null = null;

  constructor(private readonly socket: net.Socket) {
    socket.on('error', (err) => (this.error = err));
    socket.on('close', () => (this.error ??= new Error('the hypervisor closed the stream socket')));
  }

  async write(chunk: Buffer): Promise<void> {
    if (this.error) throw this.error;
    if (this.socket.write(chunk)) return;
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error): void => {
        this.socket.off('drain', done).off('error', done).off('close', onClose);
        if (err) reject(err);
        else resolve();
      };
      const onClose = (): void => done(this.error ?? new Error('the hypervisor closed the stream socket'));
      this.socket.on('drain', done).on('error', done).on('close', onClose);
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

/** The two moments of an outgoing stream, settled by a driver's events: a failure rejects both. */
export interface StreamMilestones {
  /** The switchover point: memory is copied, the hypervisor waits to pause the guest. */
  ready: Promise<void>;
  /** The stream's end. */
  done: Promise<void>;
  reachReady(): void;
  finish(): void;
  fail(err: Error): void;
}

export function streamMilestones(): StreamMilestones {
  let reachReady!: () => void;
  let failReady!: (err: Error) => void;
  let finish!: () => void;
  let failDone!: (err: Error) => void;
  const ready = new Promise<void>((resolve, reject) => ((reachReady = resolve), (failReady = reject)));
  const done = new Promise<void>((resolve, reject) => ((finish = resolve), (failDone = reject)));
  ready.catch(() => undefined);
  done.catch(() => undefined);
  return {
    ready,
    done,
    reachReady,
    finish,
    fail: (err) => {
      failReady(err);
      failDone(err);
    },
  };
}
