// The data plane: a framed, authenticated, checksummed, acknowledged message stream between two host
// agents. It knows nothing about migrations beyond the session identity; the meaning of the messages
// (blocks, pages, state, stale bitmaps, fetch requests) belongs to the migration code that uses it.
// Wire format: dataplane/PROTOCOL.md.

export interface SessionIdentity {
  migrationId: string;
  epoch: number;
  vmId: string;
  /** Free-form name of the stream within the migration (e.g. "disk", "memory", "postcopy"). */
  stream: string;
}

export interface Message {
  /** Application message type, 1..65535. */
  type: number;
  /** Small JSON metadata. */
  meta: Record<string, unknown>;
  /** Binary payload (may be empty). All-zero payloads travel as a flag, not as bytes. */
  data: Buffer;
  /** Set on received messages whose payload travelled as the ZERO flag (data is then a fresh zero-filled buffer). */
  zero?: boolean;
}

/** What the data plane does, for metrics. All calls are synchronous and must not throw. */
export interface DataPlaneObserver {
  /** A message went onto the wire (payload bytes; a ZERO-flagged payload counts 0; a resend counts again). */
  sent?(identity: SessionIdentity, type: number, bytes: number): void;
  /** A message arrived from the wire (payload bytes, as for sent). */
  received?(identity: SessionIdentity, type: number, bytes: number): void;
  /** A connection or handshake failed; `code` is the DataPlaneError code (see errorReason). */
  error?(code: string): void;
}

/** The operator's view of an error code: what went wrong, in four words. */
export type DataPlaneErrorReason = 'auth' | 'crc' | 'protocol' | 'connection' | 'refused';

export function errorReason(code: string): DataPlaneErrorReason {
  if (code === 'auth_failed') return 'auth';
  if (code === 'bad_checksum' || code === 'corrupt_frame') return 'crc';
  if (code === 'refused') return 'refused';
  if (code === 'connect_failed' || code === 'disconnected' || code === 'timeout' || code === 'connection') return 'connection';
  return 'protocol';
}

export type LogFn = (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

export interface TlsOptions {
  cert?: Buffer | string;
  key?: Buffer | string;
  ca?: Buffer | string;
  /** Client side: the name to verify in the server's certificate. */
  servername?: string;
}

export interface DataPlaneStats {
  bytesSent: number; // payload bytes put on the wire (zero blocks count 0)
  bytesAcked: number;
  messagesSent: number;
  messagesAcked: number;
  zeroMessages: number;
  reconnects: number;
  /** Window bytes in flight: header + meta + logical data length of every unacknowledged message. */
  inFlight: number;
}

export interface SendOptions {
  /**
   * A message someone waits for (a block the guest reads during postcopy): it goes ahead of every
   * queued message not yet written, past the window and without waiting for the bandwidth limiter,
   * within the caps of PROTOCOL.md ("Urgent messages").
   */
  urgent?: boolean;
}

/** Client side (the source host). Sends are pipelined; `flush` waits for every acknowledgement. */
export interface DataPlaneSession {
  readonly identity: SessionIdentity;
  /** Queue a message; resolves once it fits in the in-flight window (back-pressure). */
  send(msg: Message, opts?: SendOptions): Promise<void>;
  /** Send and wait for the peer's reply (the handler's return value). */
  request(msg: Message): Promise<Message>;
  /** Resolves when every sent message has been acknowledged (applied) by the peer. */
  flush(): Promise<void>;
  /** Messages the server pushes (e.g. on-demand fetch requests during postcopy). */
  onPush(cb: (msg: Message) => void): void;
  /** Bytes per second, or null for unlimited. Takes effect immediately. */
  setBandwidth(bytesPerSecond: number | null): void;
  readonly stats: DataPlaneStats;
  close(): Promise<void>;
}

export interface ConnectOptions {
  address: string; // host:port
  secret: Buffer;
  identity: SessionIdentity;
  tls?: TlsOptions;
  /** Max unacknowledged payload bytes in flight (default 8 MiB). */
  windowBytes?: number;
  /**
   * Max bytes written to the connection and not yet acknowledged (default: the whole window). The
   * rest of the window waits unwritten, where an urgent message can still overtake it.
   */
  writeAheadBytes?: number;
  bandwidthBytesPerSecond?: number | null;
  /** How long to keep trying to reconnect after a drop before failing pending operations (default 30 s). */
  reconnectTimeoutMs?: number;
  /** Called on every reconnect attempt failure, for logging. */
  onReconnectError?: (err: Error) => void;
  observer?: DataPlaneObserver;
  /** Handshake (connect + authenticate) timeout per attempt (default 10 s). */
  handshakeTimeoutMs?: number;
  /** A PING is sent after this much idle time; a connection silent for 3x this long is dropped and resumed (default 5 s). */
  keepaliveMs?: number;
  log?: LogFn;
}

/** Server side: one handler per session, chosen after authentication. */
export interface ServerSession {
  readonly identity: SessionIdentity;
  readonly remoteAddress: string;
  /** The client's random session id (stable across reconnects of one DataPlaneSession). */
  readonly sessionId: string;
  /** Push a message to the client (best effort: lost if the connection drops; the app re-requests). */
  push(msg: Message): void;
}

export interface SessionHandler {
  /** Apply a message. The acknowledgement is sent only after this resolves; a thrown error is sent back as an error. Return a reply for requests. */
  onMessage(session: ServerSession, msg: Message): Promise<Message | void>;
  /** The session ended: the client closed it, it stayed disconnected for sessionIdleMs, or the server closed. Not called for a dropped connection that may resume. */
  onClose?(session: ServerSession): void;
}

export interface ServerOptions {
  host: string;
  port: number; // 0 = pick a free port
  secret: Buffer;
  tls?: TlsOptions;
  observer?: DataPlaneObserver;
  /** Decide whether to accept a session (after authentication); throw DataPlaneRefused to refuse with a reason. */
  accept(identity: SessionIdentity, remoteAddress: string): Promise<SessionHandler>;
  log?: LogFn;
  /** An unauthenticated connection is closed after this long (default 10 s). */
  handshakeTimeoutMs?: number;
  /** Session state (resume point, handler) is kept this long after its connection drops (default 10 min). */
  sessionIdleMs?: number;
}

export interface DataPlaneServer {
  address: string;
  port: number;
  /** Closes the listener and every connection; calls onClose of every session. */
  close(): Promise<void>;
  /** Number of live sessions (connected or waiting for a reconnect). */
  sessions(): number;
}

export class DataPlaneError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'DataPlaneError';
  }
}

/** Thrown by ServerOptions.accept to refuse a session; the client gets DataPlaneError('refused', reason). */
export class DataPlaneRefused extends DataPlaneError {
  constructor(reason: string) {
    super('refused', reason);
    this.name = 'DataPlaneRefused';
  }
}
