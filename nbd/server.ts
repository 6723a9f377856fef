// Ferry's NBD server: exports backends (the postcopy disk, a file) on a Unix socket or TCP to any
// number of clients (QEMU's NBD block driver, qemu-io, nbdcopy...). The protocol of one client is
// in server-connection.ts.
import { promises as fs } from 'node:fs';
import * as net from 'node:net';
import type { Duplex } from 'node:stream';
import type { NbdBackend } from './backend';
import { NbdError } from './errors';
import { ServerConnection, type ConnectionHost } from './server-connection';

export type NbdListen = { path: string } | { host: string; port: number };

export interface NbdServerOptions {
  /** Export name to backend ('' is the default export). */
  exports: Record<string, NbdBackend> | ReadonlyMap<string, NbdBackend>;
  /** Protocol violations of clients and failed backend calls (each was answered or the client dropped). */
  onError: (err: Error) => void;
  /** How long close() lets requests in flight finish before it drops their connections (default 5 s). */
  closeGraceMs?: number;
  /** A client that has not finished its handshake by then is dropped (default 30 s). */
  handshakeTimeoutMs?: number;
}

export class NbdServer {
  private readonly connections = new Set<ServerConnection>();
  private readonly host: ConnectionHost;
  private closing: Promise<void> | null = null;
  private nextId = 1;

  private constructor(
    private readonly server: net.Server | null,
    private readonly where: NbdListen,
    private readonly opts: NbdServerOptions,
  ) {
    const exports = opts.exports instanceof Map ? opts.exports : new Map(Object.entries(opts.exports));
    const isClosing = () => this.closing !== null;
    this.host = {
      exports,
      onError: opts.onError,
      get shuttingDown() {
        return isClosing();
      },
    };
    server?.on('connection', (socket) => void this.serve(socket));
  }

  /**
   * Listens on a Unix socket (a stale socket file that nobody accepts on is replaced) or TCP
   * (port 0 picks one: see `address`).
   */
  static async listen(where: NbdListen, opts: NbdServerOptions): Promise<NbdServer> {
    if ('path' in where) await removeStaleSocket(where.path);
    const server = net.createServer({ pauseOnConnect: false });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => reject(new NbdError(`the NBD server cannot listen on ${describe(where)}: ${err.code ?? err.message}`)));
      server.listen('path' in where ? where.path : { host: where.host, port: where.port }, resolve);
    });
    server.removeAllListeners('error');
    server.on('error', (err) => opts.onError(new NbdError(`the NBD server on ${describe(where)} failed: ${err.message}`)));
    const addr = server.address();
    const actual = 'path' in where || !addr || typeof addr === 'string' ? where : { host: where.host, port: addr.port };
    return new NbdServer(server, actual, opts);
  }

  /** A server that listens nowhere: connections come through serve() (tests, in-process pipes). */
  static detached(opts: NbdServerOptions): NbdServer {
    return new NbdServer(null, { path: '' }, opts);
  }

  get address(): NbdListen {
    return this.where;
  }

  get clientCount(): number {
    return this.connections.size;
  }

  get shuttingDown(): boolean {
    return this.closing !== null;
  }

  /** Serves one client on any byte stream until it ends. */
  async serve(stream: Duplex): Promise<void> {
    if (this.closing) {
      stream.destroy();
      return;
    }
    const conn = new ServerConnection(stream, this.host, `NBD client ${this.nextId++} on ${describe(this.where)}`);
    this.connections.add(conn);
    const timer = setTimeout(() => conn.transmitting || conn.destroy(), this.opts.handshakeTimeoutMs ?? 30_000);
    try {
      await conn.run();
    } finally {
      clearTimeout(timer);
      this.connections.delete(conn);
    }
  }

  /**
   * Stops listening, lets requests in flight finish (up to closeGraceMs), then drops every
   * connection and removes the socket file. Requests that had no reply by then get none, so a
   * client that reconnects (QEMU with reconnect-delay) sends them again to the next server.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const stopped = this.server ? new Promise<void>((res) => this.server!.close(() => res())) : Promise.resolve();
      const conns = [...this.connections];
      for (const c of conns) if (!c.transmitting) c.destroy();
      let grace: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(conns.map((c) => c.idle())), new Promise<void>((res) => (grace = setTimeout(res, this.opts.closeGraceMs ?? 5_000)))]);
      clearTimeout(grace);
      for (const c of conns) c.destroy();
      await stopped;
      if ('path' in this.where && this.where.path) await fs.rm(this.where.path, { force: true });
    })();
    return this.closing;
  }
}

const describe = (w: NbdListen): string => ('path' in w ? `unix:${w.path}` : `${w.host}:${w.port}`);

/** A socket file left by a server that died is removed; one that a live server accepts on is an error. */
async function removeStaleSocket(path: string): Promise<void> {
  const stat = await fs.lstat(path).catch(() => null);
  if (!stat) return;
  if (!stat.isSocket()) throw new NbdError(`the NBD server cannot listen on unix:${path}: a file that is not a socket is there`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => (probe.destroy(), resolve(true)));
    probe.once('error', () => resolve(false));
  });
  if (live) throw new NbdError(`the NBD server cannot listen on unix:${path}: another server accepts connections there`);
  await fs.rm(path, { force: true });
}
