// Ferry's QMP client: one session on QEMU's QMP Unix socket. Commands are pipelined (each carries an
// id; replies are matched by it), events go to subscribers and into a short history so that a
// waiter can see an event that arrived before it started waiting. The protocol, not the
// vocabulary: commands and their arguments are the caller's (see commands.ts for a few typed ones).
import * as net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpCommandError, QmpConnectError, QmpDisconnectedError, QmpError, QmpProtocolError, QmpTimeoutError } from './errors';
import { parseGreeting, type QmpEvent, type QmpGreeting } from './messages';
import { CAPABILITIES_COMMAND, CommandIds, decodeLine, encodeCommand, LineSplitter, parseLine } from './protocol';

export interface QmpConnectOptions {
  /** Connecting (retried while the socket is missing or refuses, as when QEMU is starting), greeting and negotiation; default 10 s. */
  timeoutMs?: number;
  /** Default time a command may take before it fails with QmpTimeoutError; default 60 s. */
  commandTimeoutMs?: number;
}

export type QmpEventListener = (data: Record<string, unknown>, event: QmpEvent) => void;

/** Events kept for waitEvent(..., since). */
const HISTORY = 1000;
const RETRIABLE = new Set(['ENOENT', 'ECONNREFUSED', 'EAGAIN']);

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer?: NodeJS.Timeout;
}

export class QmpClient {
  private readonly splitter = new LineSplitter();
  private readonly ids = new CommandIds();
  private readonly pending = new Map<string, Pending>();
  /** Ids of commands that timed out: their late replies are dropped. */
  private readonly abandoned = new Set<string>();
  private readonly listeners = new Map<string, Set<QmpEventListener>>();
  private readonly closeListeners = new Set<(reason: QmpError) => void>();
  private readonly waiters = new Set<(err: QmpError) => void>();
  private readonly history: { seq: number; event: QmpEvent }[] = [];
  private seq = 0;
  private greetingWaiter: ((g: QmpGreeting | QmpError) => void) | null = null;
  private shutdown: QmpEvent | null = null;
  private socketError: string | null = null;
  private closeReason: QmpError | null = null;
  private readonly socketClosed: Promise<void>;
  private negotiated = false;
  private greetingMessage: QmpGreeting | null = null;

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
    private readonly commandTimeoutMs: number,
  ) {
    this.socketClosed = new Promise((res) => socket.once('close', () => res()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err: NodeJS.ErrnoException) => (this.socketError = err.code ?? err.message));
    socket.on('close', () => this.terminate(this.lostReason()));
  }

  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    const socket = await connectSocket(socketPath, deadline, timeoutMs);
    const client = new QmpClient(socket, socketPath, opts.commandTimeoutMs ?? 60_000);
    try {
      await client.negotiate(deadline, timeoutMs);
      return client;
    } catch (err) {
      await client.close();
      if (err instanceof QmpConnectError) throw err;
      throw new QmpConnectError(`no QMP session on ${socketPath}: ${(err as Error).message}`);
    }
  }

  /** QEMU's greeting: its version and capabilities. */
  get greeting(): QmpGreeting {
    return this.greetingMessage!;
  }

  get closed(): boolean {
    return this.closeReason !== null;
  }

  /** "7.2.22" */
  get version(): string {
    const { major, minor, micro } = this.greeting.QMP.version.qemu;
    return `${major}.${minor}.${micro}`;
  }

  /**
   * Runs a command; resolves with its `return` value, rejects with QmpCommandError (QEMU's class
   * and description), QmpTimeoutError or QmpDisconnectedError. Commands may be issued without
   * waiting for earlier ones; QEMU runs them in order.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closeReason) return Promise.reject(new QmpDisconnectedError(`cannot run ${command}: ${this.closeReason.message}`, this.closeReason instanceof QmpDisconnectedError && this.closeReason.byClient));
    const id = this.ids.take();
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { command, resolve: resolve as (v: unknown) => void, reject };
      if (timeoutMs > 0) {
        p.timer = setTimeout(() => {
          this.pending.delete(id);
          this.abandoned.add(id);
          reject(new QmpTimeoutError(`QEMU did not answer ${command} within ${timeoutMs} ms (an earlier command may block the monitor, or QEMU is stopped: SIGSTOP)`));
        }, timeoutMs);
      }
      this.pending.set(id, p);
      this.socket.write(encodeCommand({ execute: command, ...(args ? { arguments: args } : {}), id }));
    });
  }

  /** Every event named `name` ('*' for all) from now on; returns the unsubscribe. */
  on(name: string, cb: QmpEventListener): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(cb);
    return () => set.delete(cb);
  }

  /** A position in the event stream; pass it to waitEvent to also see the events that came after it. */
  eventMark(): number {
    return this.seq;
  }

  /**
   * The next event `name` that satisfies `predicate`. With `since` (from eventMark(), taken before
   * the command that causes the event), an event that already arrived counts too, so
   * `mark; execute; waitEvent(..., mark)` cannot miss an event QEMU sent before its reply.
   */
  waitEvent(name: string, predicate: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = 30_000, since?: number): Promise<QmpEvent> {
    if (since !== undefined) {
      const seen = this.history.find((h) => h.seq > since && h.event.event === name && predicate(h.event.data));
      if (seen) return Promise.resolve(seen.event);
    }
    if (this.closeReason) return Promise.reject(new QmpDisconnectedError(`no ${name} event will come: ${this.closeReason.message}`));
    return new Promise<QmpEvent>((resolve, reject) => {
      const finish = (err: QmpError | null, ev?: QmpEvent) => {
        clearTimeout(timer);
        off();
        this.waiters.delete(abort);
        if (err) reject(err);
        else resolve(ev!);
      };
      const abort = (err: QmpError) => finish(new QmpDisconnectedError(`no ${name} event will come: ${err.message}`));
      const off = this.on(name, (data, ev) => predicate(data) && finish(null, ev));
      const timer = setTimeout(() => finish(new QmpTimeoutError(`no ${name} event from QEMU within ${timeoutMs} ms`)), timeoutMs);
      this.waiters.add(abort);
    });
  }

  /** Called once when the session ends, with why (QmpDisconnectedError with byClient after close()). */
  onClose(cb: (reason: QmpError) => void): () => void {
    if (this.closeReason) {
      const reason = this.closeReason;
      queueMicrotask(() => cb(reason));
      return () => undefined;
    }
    this.closeListeners.add(cb);
    return () => this.closeListeners.delete(cb);
  }

  /** Ends the session; commands in flight reject with QmpDisconnectedError. Resolves once the socket is closed. */
  async close(): Promise<void> {
    this.terminate(new QmpDisconnectedError(`the QMP connection to ${this.socketPath} was closed by Ferry`, true));
    await this.socketClosed;
  }

  private async negotiate(deadline: number, timeoutMs: number): Promise<void> {
    const left = () => Math.max(1, deadline - Date.now());
    const greeting = await new Promise<QmpGreeting | QmpError>((resolve) => {
      const t = setTimeout(
        () =>
          resolve(
            new QmpConnectError(
              `connected to ${this.socketPath} but QEMU sent no QMP greeting within ${timeoutMs} ms (QEMU serves one QMP client per socket: is another client connected?)`,
            ),
          ),
        left(),
      );
      this.greetingWaiter = (g) => (clearTimeout(t), resolve(g));
    });
    this.greetingWaiter = null;
    if (greeting instanceof QmpError) throw greeting;
    this.greetingMessage = greeting;
    try {
      await this.execute(CAPABILITIES_COMMAND, undefined, { timeoutMs: left() });
    } catch (err) {
      throw new QmpConnectError(`QMP capabilities negotiation on ${this.socketPath} failed: ${(err as Error).message}`);
    }
    this.negotiated = true;
  }

  private onData(chunk: Buffer): void {
    try {
      for (const line of this.splitter.push(chunk)) this.onLine(line);
    } catch (err) {
      this.terminate(err instanceof QmpError ? err : new QmpProtocolError(String(err)));
    }
  }

  private onLine(line: string): void {
    if (this.greetingWaiter) {
      if (line.trim() === '') return;
      this.greetingWaiter(parseGreeting(parseLine(line)));
      return;
    }
    const msg = decodeLine(line);
    if (!msg) return;
    if (msg.kind === 'event') return this.onEvent(msg.event);
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p) {
      if (id !== undefined && this.abandoned.delete(id)) return;
      if (msg.kind === 'error' && msg.id === undefined) throw new QmpProtocolError(`QEMU could not take a command: ${msg.errorClass}: ${msg.desc}`);
      throw new QmpProtocolError(`QEMU replied to id ${JSON.stringify(msg.id)}, which no command in flight has`);
    }
    this.pending.delete(id!);
    clearTimeout(p.timer);
    if (msg.kind === 'return') p.resolve(msg.value);
    else p.reject(new QmpCommandError(p.command, msg.errorClass, msg.desc));
  }

  private onEvent(event: QmpEvent): void {
    if (event.event === 'SHUTDOWN') this.shutdown = event;
    this.history.push({ seq: ++this.seq, event });
    if (this.history.length > HISTORY) this.history.shift();
    for (const name of [event.event, '*']) {
      for (const cb of [...(this.listeners.get(name) ?? [])]) {
        try {
          cb(event.data, event);
        } catch (err) {
          // A listener's bug must not corrupt the session; it surfaces as an uncaught exception.
          queueMicrotask(() => {
            throw err;
          });
        }
      }
    }
  }

  private lostReason(): QmpError {
    if (this.shutdown) return new QmpDisconnectedError(`QEMU shut down (${String(this.shutdown.data.reason ?? 'no reason given')}) and closed the QMP connection ${this.socketPath}`);
    const how = this.socketError ? ` (${this.socketError})` : '';
    const phase = this.negotiated ? '' : ' during the QMP handshake';
    return new QmpDisconnectedError(`QEMU closed the QMP connection ${this.socketPath}${phase} without a SHUTDOWN event${how}: it was killed or crashed`);
  }

  private terminate(reason: QmpError): void {
    if (this.closeReason) return;
    this.closeReason = reason;
    this.socket.destroy();
    this.greetingWaiter?.(reason instanceof QmpConnectError ? reason : new QmpConnectError(`no QMP greeting on ${this.socketPath}: ${reason.message}`));
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new QmpDisconnectedError(`${p.command} got no reply: ${reason.message}`, reason instanceof QmpDisconnectedError && reason.byClient));
    }
    this.pending.clear();
    for (const abort of [...this.waiters]) abort(reason);
    for (const cb of this.closeListeners) cb(reason);
    this.closeListeners.clear();
    this.listeners.clear();
  }
}

/** Connects to QMP's socket, retrying while it does not exist yet or refuses (QEMU starting up). */
async function connectSocket(path: string, deadline: number, timeoutMs: number): Promise<net.Socket> {
  for (let delay = 20; ; delay = Math.min(delay * 2, 200)) {
    const socket = net.connect(path);
    const result = await new Promise<NodeJS.ErrnoException | null>((resolve) => {
      socket.once('connect', () => resolve(null));
      socket.once('error', (err) => resolve(err));
    });
    if (!result) {
      socket.removeAllListeners('error');
      return socket;
    }
    socket.destroy();
    const code = result.code ?? result.message;
    if (!RETRIABLE.has(code) || Date.now() + delay > deadline) {
      throw new QmpConnectError(`cannot connect to QMP at ${path}: ${code}${RETRIABLE.has(code) ? ` for ${timeoutMs} ms` : ''} (is QEMU running with -qmp unix:${path},server=on,wait=off?)`);
    }
    await sleep(delay);
  }
}
