// The agent side of the control socket: one connection, pipelined commands matched by id, events.
import * as net from 'node:net';
import { HypervisorError } from '../errors';
import { FrameParser, encodeFrame, type JsonObject } from './protocol';

export interface Reply {
  ret: JsonObject;
  attachment: Buffer | null;
}

export interface ControlEvent {
  event: string;
  data: JsonObject;
}

interface Pending {
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout | null;
}

export const DEFAULT_COMMAND_TIMEOUT_MS = 120_000;

export class ControlClient {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly eventListeners = new Set<(e: ControlEvent) => void>();
  private readonly closeListeners = new Set<() => void>();
  private isClosed = false;

  private constructor(
    private readonly socket: net.Socket,
    readonly greeting: { version: number; vmId: string; pid: number },
  ) {}

  /** Connects and waits for the greeting. Rejects with ConnectionClosed if nobody answers. */
  static connect(socketPath: string, opts: { timeoutMs?: number; expectVmId?: string } = {}): Promise<ControlClient> {
    const timeoutMs = opts.timeoutMs ?? 5_000;
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(socketPath);
      const parser = new FrameParser();
      let client: ControlClient | null = null;
      const fail = (e: Error): void => {
        clearTimeout(timer);
        socket.destroy();
        reject(e);
      };
      const timer = setTimeout(
        () => fail(new HypervisorError('Timeout', `no greeting on ${socketPath} within ${timeoutMs} ms`)),
        timeoutMs,
      );
      socket.on('error', (e) => {
        if (client) client.shutdown(new HypervisorError('ConnectionClosed', `control socket error: ${e.message}`));
        else fail(new HypervisorError('ConnectionClosed', `cannot connect to ${socketPath}: ${e.message}`));
      });
      socket.on('close', () => {
        if (client) client.shutdown(new HypervisorError('ConnectionClosed', 'the VM process closed the control socket'));
        else fail(new HypervisorError('ConnectionClosed', `${socketPath} closed before the greeting`));
      });
      socket.on('data', (chunk: Buffer) => {
        for (const ev of parser.push(chunk)) {
          if (ev.type === 'error') continue; // a peer bug; nothing of ours to match it to
          if (client) {
            client.onFrame(ev.json, ev.attachment);
            continue;
          }
          const g = ev.json['ferry-vm'] as { version: number; vmId: string; pid: number } | undefined;
          if (!g || typeof g !== 'object') return fail(new HypervisorError('ParseError', `${socketPath} is not a Ferry VM control socket`));
          if (opts.expectVmId !== undefined && g.vmId !== opts.expectVmId) {
            return fail(new HypervisorError('InvalidState', `${socketPath} belongs to VM ${g.vmId}, not ${opts.expectVmId}`));
          }
          clearTimeout(timer);
          client = new ControlClient(socket, g);
          resolve(client);
        }
      });
    });
  }

  get closed(): boolean {
    return this.isClosed;
  }

  request(execute: string, args: JsonObject = {}, attachment?: Buffer, timeoutMs = DEFAULT_COMMAND_TIMEOUT_MS): Promise<Reply> {
    if (this.isClosed) {
      return Promise.reject(new HypervisorError('VmNotRunning', 'the control connection is closed: attach to the VM again'));
    }
    const id = this.nextId++;
    return new Promise<Reply>((resolve, reject) => {
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.pending.delete(id);
              reject(new HypervisorError('Timeout', `${execute} got no reply within ${timeoutMs} ms`));
            }, timeoutMs)
          : null;
      this.pending.set(id, { resolve, reject, timer });
      this.socket.cork();
      for (const b of encodeFrame({ execute, arguments: args, id }, attachment)) this.socket.write(b);
      this.socket.uncork();
    });
  }

  onEvent(cb: (e: ControlEvent) => void): () => void {
    this.eventListeners.add(cb);
    return () => this.eventListeners.delete(cb);
  }

  onClose(cb: () => void): () => void {
    this.closeListeners.add(cb);
    return () => this.closeListeners.delete(cb);
  }

  close(): void {
    this.shutdown(new HypervisorError('ConnectionClosed', 'the control connection was closed by this side'));
    this.socket.destroy();
  }

  private onFrame(json: JsonObject, attachment: Buffer | null): void {
    if (typeof json.event === 'string') {
      const e = { event: json.event, data: (json.data ?? {}) as JsonObject };
      for (const cb of this.eventListeners) cb(e);
      return;
    }
    const id = json.id;
    const p = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (!p) return;
    this.pending.delete(id as number);
    if (p.timer) clearTimeout(p.timer);
    if (json.error && typeof json.error === 'object') {
      const err = json.error as { class?: unknown; desc?: unknown };
      p.reject(new HypervisorError(String(err.class ?? 'GenericError'), String(err.desc ?? 'no description')));
    } else {
      p.resolve({ ret: (json.return ?? {}) as JsonObject, attachment });
    }
  }

  private shutdown(err: Error): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const p of this.pending.values()) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    for (const cb of this.closeListeners) cb();
  }
}
