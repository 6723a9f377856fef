// The VM side of the control socket: greeting, command dispatch, replies and broadcast events.
import * as net from 'node:net';
import { HypervisorError } from '../errors';
import { FrameParser, PROTOCOL_VERSION, encodeFrame, type JsonObject } from './protocol';

export interface CommandResult {
  ret?: JsonObject;
  attachment?: Buffer;
}

export type CommandHandler = (args: JsonObject, attachment: Buffer | null) => CommandResult | Promise<CommandResult>;

const MAX_CLIENTS = 16;

export class ControlServer {
  private readonly server: net.Server;
  private readonly clients = new Set<net.Socket>();

  constructor(
    private readonly vmId: string,
    private readonly commands: Map<string, CommandHandler>,
    private readonly log: (msg: string, extra?: JsonObject) => void,
  ) {
    this.server = net.createServer((socket) => this.onConnection(socket));
    this.server.maxConnections = MAX_CLIENTS;
  }

  listen(socketPath: string): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(socketPath, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  /** Ends every connection after what was written to it (the last replies and events) is flushed. */
  close(): Promise<void> {
    for (const c of this.clients) c.end();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  broadcast(event: string, data: JsonObject): void {
    const frame = encodeFrame({ event, data, timestamp: Date.now() });
    for (const c of this.clients) if (!c.destroyed) for (const b of frame) c.write(b);
  }

  private onConnection(socket: net.Socket): void {
    this.clients.add(socket);
    const parser = new FrameParser();
    const send = (json: JsonObject, attachment?: Buffer): void => {
      if (socket.destroyed) return;
      socket.cork();
      for (const b of encodeFrame(json, attachment)) socket.write(b);
      socket.uncork();
    };
    const sendError = (errorClass: string, desc: string, id: unknown): void =>
      send({ error: { class: errorClass, desc }, id: id ?? null });

    send({ 'ferry-vm': { version: PROTOCOL_VERSION, vmId: this.vmId, pid: process.pid } });
    socket.on('data', (chunk: Buffer) => {
      for (const ev of parser.push(chunk)) {
        if (ev.type === 'error') {
          sendError(ev.errorClass, ev.desc, ev.id);
          continue;
        }
        const { json, attachment } = ev;
        const id = Object.hasOwn(json, 'id') ? json.id : null;
        const name = json.execute;
        if (typeof name !== 'string') {
          sendError('ParseError', 'a command needs "execute": "<command name>" (see query-commands)', id);
          continue;
        }
        const handler = this.commands.get(name);
        if (!handler) {
          sendError('CommandNotFound', `unknown command ${JSON.stringify(name)}: run query-commands for the list`, id);
          continue;
        }
        const args = json.arguments ?? {};
        if (args === null || typeof args !== 'object' || Array.isArray(args)) {
          sendError('InvalidArgument', '"arguments" must be a JSON object', id);
          continue;
        }
        this.run(name, handler, args as JsonObject, attachment, id, send, sendError);
      }
    });
    socket.on('error', () => undefined); // a client going away mid-write is its business
    socket.on('close', () => this.clients.delete(socket));
  }

  private run(
    name: string,
    handler: CommandHandler,
    args: JsonObject,
    attachment: Buffer | null,
    id: unknown,
    send: (json: JsonObject, attachment?: Buffer) => void,
    sendError: (errorClass: string, desc: string, id: unknown) => void,
  ): void {
    const fail = (e: unknown): void => {
      if (e instanceof HypervisorError) sendError(e.code, e.detail, id);
      else {
        this.log('command failed', { command: name, error: String((e as Error)?.stack ?? e) });
        sendError('GenericError', `${name} failed: ${(e as Error)?.message ?? String(e)}`, id);
      }
    };
    try {
      const r = handler(args, attachment);
      if (r instanceof Promise) r.then((res) => send({ return: res.ret ?? {}, id }, res.attachment), fail);
      else send({ return: r.ret ?? {}, id }, r.attachment);
    } catch (e) {
      fail(e);
    }
  }
}
