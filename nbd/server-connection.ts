// One client of Ferry's NBD server: the fixed newstyle handshake, then requests served concurrently
// (each replied to as soon as its backend call ends, so replies go out of order). A peer that
// breaks the framing (bad magic, an oversized payload) is dropped; anything else gets the spec's
// error reply and the connection goes on.
import type { Duplex } from 'node:stream';
import type { NbdBackend } from './backend';
import { ByteReader } from './byte-reader';
import { NbdBackendError, NbdDisconnectedError, NbdError, NbdProtocolError } from './errors';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  cmdName,
  decodeGo,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeRequest,
  DEFAULT_MAX_PAYLOAD,
  encodeBlockStatus,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOffsetData,
  encodeOffsetHole,
  encodeOptionReply,
  encodeServerGreeting,
  encodeServerReply,
  encodeSimpleReply,
  errnoFromCode,
  errnoName,
  HandshakeFlag,
  Info,
  MAX_STRING_BYTES,
  NbdErrno,
  Option,
  OPTION_HEADER_BYTES,
  optionName,
  ReplyFlag,
  ReplyType,
  Rep,
  REQUEST_BYTES,
  TransmissionFlag,
  type BlockSizes,
  type RawRequest,
} from './protocol';

/** Option data larger than this is refused with NBD_REP_ERR_TOO_BIG and the connection dropped. */
export const MAX_OPTION_DATA = 64 << 10;
/** Requests served at once per connection, and the bytes they may hold. */
const MAX_IN_FLIGHT = 64;
const MAX_IN_FLIGHT_BYTES = 256 << 20;
const ZEROES = Buffer.alloc(1 << 20);
/** Context id of base:allocation (ids are per connection; there is only this one). */
const ALLOCATION_ID = 1;

export interface ConnectionHost {
  exports: ReadonlyMap<string, NbdBackend>;
  /** A client broke the protocol, or a backend call failed. */
  onError(err: Error): void;
  readonly shuttingDown: boolean;
}

interface Selected {
  name: string;
  backend: NbdBackend;
}

export class ServerConnection {
  private readonly reader: ByteReader;
  private structured = false;
  private noZeroes = false;
  /** base:allocation selected, and for which export. */
  private allocationFor: string | null = null;
  private inFlight = 0;
  private inFlightBytes = 0;
  private slotWaiter: (() => void) | null = null;
  private idleWaiter: (() => void) | null = null;
  /** The transmission phase began: closing now waits for requests in flight. */
  transmitting = false;

  constructor(
    private readonly stream: Duplex,
    private readonly host: ConnectionHost,
    readonly label: string,
  ) {
    this.reader = new ByteReader(stream);
  }

  /** Serves the connection until it ends; never rejects. */
  async run(): Promise<void> {
    try {
      const selected = await this.handshake();
      if (selected) await this.transmit(selected);
    } catch (err) {
      if (!(err instanceof NbdDisconnectedError) && !this.host.shuttingDown) this.host.onError(this.labelled(err));
    } finally {
      // end, not destroy: a last reply (NBD_REP_ERR_TOO_BIG, an ABORT's ACK) still reaches the peer.
      const destroy = setTimeout(() => this.stream.destroy(), 2_000).unref();
      this.stream.end(() => (clearTimeout(destroy), this.stream.destroy()));
    }
  }

  /** Resolves when no request is being served (close() waits for this, bounded). */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((res) => (this.idleWaiter = res));
  }

  destroy(): void {
    this.stream.destroy();
  }

  // ---- handshake ----

  private async handshake(): Promise<Selected | null> {
    this.stream.write(encodeServerGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    if (clientFlags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) throw this.violation(`unknown client flags 0x${clientFlags.toString(16)}`);
    this.noZeroes = (clientFlags & ClientFlag.NO_ZEROES) !== 0;
    for (;;) {
      const { option, length } = decodeOptionHeader(await this.reader.read(OPTION_HEADER_BYTES));
      if (length > MAX_OPTION_DATA) {
        this.reply(option, Rep.ERR_TOO_BIG, `option data of ${length} bytes; at most ${MAX_OPTION_DATA}`);
        throw this.violation(`${optionName(option)} with ${length} bytes of data`);
      }
      const data = await this.reader.read(length);
      if (this.host.shuttingDown && option !== Option.ABORT) {
        this.reply(option, Rep.ERR_SHUTDOWN, 'the server is shutting down');
        continue;
      }
      const selected = await this.option(option, data);
      if (selected === 'abort') return null;
      if (selected) return selected;
    }
  }

  /** One option; the export when it enters transmission, 'abort' when the client gave up. */
  private async option(option: number, data: Buffer): Promise<Selected | 'abort' | null> {
    const invalid = (why: string) => (this.reply(option, Rep.ERR_INVALID, why), null);
    switch (option) {
      case Option.EXPORT_NAME: {
        const name = data.toString('utf8');
        const backend = this.host.exports.get(name);
        if (!backend || data.length > MAX_STRING_BYTES) throw this.violation(`NBD_OPT_EXPORT_NAME for unknown export '${name}' (the session ends: that option cannot carry an error)`);
        this.stream.write(encodeExportNameReply(backend.size, this.transmissionFlags(backend), !this.noZeroes));
        return this.enter(name, backend);
      }
      case Option.ABORT:
        await new Promise<void>((res) => this.stream.write(encodeOptionReply(option, Rep.ACK), () => res()));
        return 'abort';
      case Option.LIST:
        if (data.length > 0) return invalid('NBD_OPT_LIST takes no data');
        for (const [name, backend] of this.host.exports) this.stream.write(encodeOptionReply(option, Rep.SERVER, encodeServerReply(name, backend.description)));
        this.reply(option, Rep.ACK);
        return null;
      case Option.STRUCTURED_REPLY:
        if (data.length > 0) return invalid('NBD_OPT_STRUCTURED_REPLY takes no data');
        if (this.structured) return invalid('structured replies are already negotiated');
        this.structured = true;
        this.reply(option, Rep.ACK);
        return null;
      case Option.SET_META_CONTEXT:
      case Option.LIST_META_CONTEXT:
        return this.metaContext(option, data);
      case Option.INFO:
      case Option.GO: {
        let req;
        try {
          req = decodeGo(data);
        } catch (err) {
          return invalid((err as Error).message);
        }
        const backend = this.host.exports.get(req.exportName);
        if (!backend) {
          this.reply(option, Rep.ERR_UNKNOWN, `no export '${req.exportName}' (exports: ${[...this.host.exports.keys()].map((n) => `'${n}'`).join(', ') || 'none'})`);
          return null;
        }
        const flags = this.transmissionFlags(backend);
        this.stream.write(encodeOptionReply(option, Rep.INFO, encodeInfoExport(backend.size, flags)));
        this.stream.write(encodeOptionReply(option, Rep.INFO, encodeInfoBlockSize(blockSizesOf(backend))));
        if (req.infoRequests.includes(Info.NAME)) this.stream.write(encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.NAME, req.exportName)));
        if (req.infoRequests.includes(Info.DESCRIPTION) && backend.description) this.stream.write(encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.DESCRIPTION, backend.description)));
        this.reply(option, Rep.ACK);
        return option === Option.GO ? this.enter(req.exportName, backend) : null;
      }
      default:
        this.reply(option, Rep.ERR_UNSUP, `${optionName(option)} is not supported by this server`);
        return null;
    }
  }

  private metaContext(option: number, data: Buffer): null {
    const set = option === Option.SET_META_CONTEXT;
    if (set) this.allocationFor = null; // a SET replaces the selection, even when it fails
    if (!this.structured) return (this.reply(option, Rep.ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first'), null);
    let req;
    try {
      req = decodeMetaContextRequest(data);
    } catch (err) {
      return (this.reply(option, Rep.ERR_INVALID, (err as Error).message), null);
    }
    if (!this.host.exports.has(req.exportName)) return (this.reply(option, Rep.ERR_UNKNOWN, `no export '${req.exportName}'`), null);
    if (req.queries.some((q) => !q.includes(':'))) return (this.reply(option, Rep.ERR_INVALID, 'a query must start with a namespace and a colon'), null);
    const matches = set ? req.queries.includes(BASE_ALLOCATION) : req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION);
    if (matches) this.stream.write(encodeOptionReply(option, Rep.META_CONTEXT, encodeMetaContextReply(set ? ALLOCATION_ID : 0, BASE_ALLOCATION)));
    if (set && matches) this.allocationFor = req.exportName;
    this.reply(option, Rep.ACK);
    return null;
  }

  private enter(name: string, backend: NbdBackend): Selected {
    if (this.allocationFor !== name) this.allocationFor = null;
    this.transmitting = true;
    return { name, backend };
  }

  private transmissionFlags(backend: NbdBackend): number {
    let f = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_CACHE;
    if (backend.readOnly) f |= TransmissionFlag.READ_ONLY;
    else f |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES | (backend.trim ? TransmissionFlag.SEND_TRIM : 0);
    if (backend.multiConn) f |= TransmissionFlag.CAN_MULTI_CONN;
    if (this.structured) f |= TransmissionFlag.SEND_DF;
    return f;
  }

  private reply(option: number, type: number, message = ''): void {
    this.stream.write(encodeOptionReply(option, type, message ? Buffer.from(message.slice(0, MAX_STRING_BYTES), 'utf8') : undefined));
  }

  private labelled(err: unknown): NbdError {
    const message = err instanceof Error ? err.message : String(err);
    if (message.startsWith(this.label)) return err as NbdError;
    return err instanceof NbdProtocolError ? new NbdProtocolError(`${this.label}: ${message}; connection dropped`) : new NbdError(`${this.label}: ${message}`);
  }

  private violation(what: string): NbdProtocolError {
    return new NbdProtocolError(`${this.label}: ${what}; connection dropped`);
  }

  // ---- transmission ----

  private async transmit(sel: Selected): Promise<void> {
    const max = blockSizesOf(sel.backend).maximum;
    for (;;) {
      if (this.inFlight >= MAX_IN_FLIGHT || this.inFlightBytes >= MAX_IN_FLIGHT_BYTES) await new Promise<void>((res) => (this.slotWaiter = res));
      const req = decodeRequest(await this.reader.read(REQUEST_BYTES));
      let payload: Buffer | undefined;
      if (req.type === Cmd.WRITE) {
        if (req.length > max) throw this.violation(`NBD_CMD_WRITE of ${req.length} bytes; the maximum payload is ${max}`);
        payload = await this.reader.read(req.length);
      }
      // Requests that arrive while the server closes get no reply: a client that reconnects resends them.
      if (this.host.shuttingDown) continue;
      if (req.type === Cmd.DISC) {
        await this.idle();
        await new Promise<void>((res) => this.stream.end(res));
        return;
      }
      const bytes = req.type === Cmd.READ || req.type === Cmd.WRITE ? req.length : 0;
      this.inFlight++;
      this.inFlightBytes += bytes;
      void this.serve(sel, req, payload).then((parts) => this.send(parts, bytes));
    }
  }

  /** Writes a reply; the request's slot is free once the socket took it. */
  private send(parts: Buffer[], bytes: number): void {
    const done = () => {
      this.inFlight--;
      this.inFlightBytes -= bytes;
      const wake = this.slotWaiter;
      this.slotWaiter = null;
      wake?.();
      if (this.inFlight === 0) {
        const idle = this.idleWaiter;
        this.idleWaiter = null;
        idle?.();
      }
    };
    if (this.stream.destroyed) return done();
    parts.forEach((p, i) => (i === parts.length - 1 ? this.stream.write(p, () => done()) : this.stream.write(p)));
  }

  /** The reply to one request, as buffers to write. */
  private async serve(sel: Selected, req: RawRequest, payload: Buffer | undefined): Promise<Buffer[]> {
    const refusal = this.check(sel, req);
    if (refusal) return this.errorReply(req, refusal.errno, refusal.message);
    const { backend } = sel;
    const offset = Number(req.offset);
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    try {
      switch (req.type) {
        case Cmd.READ: {
          const data = req.length === 0 ? Buffer.alloc(0) : await backend.read(offset, req.length);
          if (data.length !== req.length) throw new NbdBackendError(`the backend returned ${data.length} of ${req.length} bytes`, NbdErrno.EIO);
          if (!this.structured) return [encodeSimpleReply(0, req.cookie), data];
          if (data.length === 0) return [encodeChunkHeader(ReplyFlag.DONE, ReplyType.NONE, req.cookie, 0)];
          if (isZero(data)) return [encodeOffsetHole(ReplyFlag.DONE, req.cookie, offset, data.length)];
          return encodeOffsetData(ReplyFlag.DONE, req.cookie, offset, data);
        }
        case Cmd.WRITE:
          await backend.write(offset, payload!, { fua });
          break;
        case Cmd.FLUSH:
          await backend.flush();
          break;
        case Cmd.TRIM:
          await backend.trim!(offset, req.length, { fua });
          break;
        case Cmd.WRITE_ZEROES:
          if (backend.writeZeroes) await backend.writeZeroes(offset, req.length, { fua, noHole: (req.flags & CmdFlag.NO_HOLE) !== 0 });
          else {
            for (let at = 0; at < req.length; at += ZEROES.length) await backend.write(offset + at, ZEROES.subarray(0, Math.min(ZEROES.length, req.length - at)), { fua: false });
            if (fua) await backend.flush();
          }
          break;
        case Cmd.CACHE:
          if (backend.cache) await backend.cache(offset, req.length);
          else for (let at = 0; at < req.length; at += DEFAULT_MAX_PAYLOAD) await backend.read(offset + at, Math.min(DEFAULT_MAX_PAYLOAD, req.length - at));
          break;
        case Cmd.BLOCK_STATUS:
          return [await this.blockStatus(backend, req, offset)];
      }
      // Success without data: a simple reply, which the spec allows with or without structured replies.
      return [encodeSimpleReply(0, req.cookie)];
    } catch (err) {
      const errno = err instanceof NbdBackendError ? err.errno : errnoFromCode((err as NodeJS.ErrnoException).code);
      const message = `${cmdName(req.type)} of ${req.length} bytes at ${offset} on '${sel.name}' failed: ${(err as Error).message}`;
      this.host.onError(new NbdError(`${this.label}: ${message} (answered ${errnoName(errno)})`));
      return this.errorReply(req, errno, message);
    }
  }

  private async blockStatus(backend: NbdBackend, req: RawRequest, offset: number): Promise<Buffer> {
    const end = offset + req.length;
    const extents = backend.allocation ? await backend.allocation(offset, req.length) : [{ length: req.length, flags: 0 }];
    // What goes out is consecutive, non-empty, within the request, and one extent if REQ_ONE.
    const out: { length: number; flags: number }[] = [];
    let at = offset;
    for (const e of extents) {
      const n = Math.min(e.length, end - at);
      if (n <= 0) break;
      out.push({ length: n, flags: e.flags });
      at += n;
      if (req.flags & CmdFlag.REQ_ONE) break;
    }
    if (out.length === 0) throw new NbdBackendError('the backend described no extent', NbdErrno.EIO);
    return encodeBlockStatus(ReplyFlag.DONE, req.cookie, ALLOCATION_ID, out);
  }

  private errorReply(req: RawRequest, errno: number, message: string): Buffer[] {
    if (this.structured) return [encodeErrorChunk(ReplyFlag.DONE, req.cookie, errno, message)];
    return [encodeSimpleReply(errno, req.cookie)];
  }

  /** The spec's refusals: unknown commands and flags, ranges, read-only exports, missing contexts. */
  private check(sel: Selected, req: RawRequest): { errno: number; message: string } | null {
    const { backend } = sel;
    const refuse = (errno: number, why: string) => ({ errno, message: `${cmdName(req.type)}: ${why}` });
    const allowed: Record<number, number> = {
      [Cmd.READ]: CmdFlag.FUA | (this.structured ? CmdFlag.DF : 0),
      [Cmd.WRITE]: CmdFlag.FUA,
      [Cmd.FLUSH]: CmdFlag.FUA,
      [Cmd.TRIM]: CmdFlag.FUA,
      [Cmd.CACHE]: CmdFlag.FUA,
      [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE,
      [Cmd.BLOCK_STATUS]: CmdFlag.FUA | CmdFlag.REQ_ONE,
    };
    if (!(req.type in allowed)) return refuse(NbdErrno.EINVAL, 'unknown command');
    if (req.type === Cmd.TRIM && !backend.trim) return refuse(NbdErrno.EINVAL, 'not offered by this export');
    if (req.flags & ~allowed[req.type]) return refuse(NbdErrno.EINVAL, `flags 0x${req.flags.toString(16)} are not valid for this command`);
    if (req.type === Cmd.FLUSH) return req.offset === 0n && req.length === 0 ? null : refuse(NbdErrno.EINVAL, 'offset and length must be 0');
    const writes = req.type === Cmd.WRITE || req.type === Cmd.WRITE_ZEROES || req.type === Cmd.TRIM;
    if (writes && backend.readOnly) return refuse(NbdErrno.EPERM, `export '${sel.name}' is read-only`);
    if (req.offset + BigInt(req.length) > BigInt(backend.size)) {
      const errno = req.type === Cmd.WRITE || req.type === Cmd.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
      return refuse(errno, `${req.length} bytes at ${req.offset} are past the end of the export (${backend.size} bytes)`);
    }
    const { minimum, maximum } = blockSizesOf(backend);
    if (Number(req.offset) % minimum !== 0 || (req.length % minimum !== 0 && Number(req.offset) + req.length !== backend.size)) return refuse(NbdErrno.EINVAL, `not aligned to the minimum block size ${minimum}`);
    if (req.type === Cmd.READ && req.length > maximum) return refuse(this.structured ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL, `${req.length} bytes is more than the maximum payload ${maximum}`);
    if (req.type === Cmd.BLOCK_STATUS) {
      if (this.allocationFor !== sel.name) return refuse(NbdErrno.EINVAL, 'no metadata context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)');
      if (req.length === 0) return refuse(NbdErrno.EINVAL, 'length 0');
    }
    return null;
  }
}

function blockSizesOf(backend: NbdBackend): BlockSizes {
  return { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD, ...backend.blockSizes };
}

function isZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += ZEROES.length) {
    const n = Math.min(ZEROES.length, b.length - at);
    if (!b.subarray(at, at + n).equals(ZEROES.subarray(0, n))) return false;
  }
  return true;
}
