// Socket plumbing shared by client and server: dialing (plain or TLS) and writing encoded frames.
import * as net from 'node:net';
import * as tls from 'node:tls';
import { DataPlaneError, type TlsOptions } from './api';

export function parseAddress(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  const host = i > 0 ? address.slice(0, i).replace(/^\[(.*)\]$/, '$1') : '';
  const port = Number(address.slice(i + 1));
  if (!host || !Number.isInteger(port) || port <= 0 || port > 65535) {
    throw new DataPlaneError('bad_config', `invalid data-plane address ${JSON.stringify(address)}: expected host:port`);
  }
  return { host, port };
}

/** Starts a connection; `ready` is the event that fires once bytes can be exchanged. */
export function dial(address: string, tlsOpts: TlsOptions | undefined): { socket: net.Socket; ready: string } {
  const { host, port } = parseAddress(address);
  if (tlsOpts) {
    const socket = tls.connect({
      host,
      port,
      ca: tlsOpts.ca,
      cert: tlsOpts.cert,
      key: tlsOpts.key,
      servername: tlsOpts.servername ?? (net.isIP(host) ? undefined : host),
    });
    return { socket, ready: 'secureConnect' };
  }
  return { socket: net.connect({ host, port }), ready: 'connect' };
}

export function tuneSocket(socket: net.Socket): void {
  socket.setNoDelay(true);
  socket.setKeepAlive(true, 10_000);
}

/** Writes an encoded frame (header+meta, then payload) as one batch; returns false when the socket buffer is full. */
export function writeParts(socket: net.Socket, parts: Buffer[]): boolean {
  if (socket.destroyed || !socket.writable) return false;
  if (parts.length === 1) return socket.write(parts[0]);
  socket.cork();
  for (let i = 0; i < parts.length - 1; i++) socket.write(parts[i]);
  const ok = socket.write(parts[parts.length - 1]);
  socket.uncork();
  return ok;
}
