// A raw NBD peer for tests that send what no well-behaved client (or server) would: byte-level
// handshakes, requests and replies built with the codecs, over a socket or an in-memory pipe.
import { Duplex, PassThrough } from 'node:stream';
import type { NbdBackend } from '../../nbd/backend';
import { ByteReader } from '../../nbd/byte-reader';
import {
  decodeChunkHeader,
  decodeOptionReplyHeader,
  encodeGo,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  Info,
  Option,
  OPTION_REPLY_HEADER_BYTES,
  Rep,
  SIMPLE_REPLY_BYTES,
  SIMPLE_REPLY_MAGIC,
  u32,
  type Request,
} from '../../nbd/protocol';

/** Two connected in-memory streams: what one writes, the other reads. */
export function duplexPair(): [Duplex, Duplex] {
  const ab = new PassThrough();
  const ba = new PassThrough();
  return [Duplex.from({ readable: ba, writable: ab }), Duplex.from({ readable: ab, writable: ba })];
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export type Reply = { kind: 'simple'; error: number; cookie: bigint } | { kind: 'chunk'; flags: number; type: number; cookie: bigint; payload: Buffer };

export class RawPeer {
  readonly reader: ByteReader;

  constructor(readonly stream: Duplex) {
    this.reader = new ByteReader(stream);
  }

  write(...parts: Buffer[]): void {
    for (const p of parts) this.stream.write(p);
  }

  /** The server's 18-byte greeting; returns its handshake flags. */
  async greeting(): Promise<number> {
    return (await this.reader.read(18)).readUInt16BE(16);
  }

  async optionReply(): Promise<OptionReply> {
    const h = decodeOptionReplyHeader(await this.reader.read(OPTION_REPLY_HEADER_BYTES));
    return { option: h.option, type: h.type, data: await this.reader.read(h.length) };
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.write(encodeOption(option, data));
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type !== Rep.SERVER && r.type !== Rep.INFO && r.type !== Rep.META_CONTEXT) return out;
    }
  }

  /** Greeting, client flags, optional structured replies and contexts, then GO. */
  async open(exportName: string, opts: { structured?: boolean; contexts?: string[] } = {}): Promise<OptionReply[]> {
    await this.greeting();
    this.write(u32(3));
    if (opts.structured ?? true) await this.option(Option.STRUCTURED_REPLY);
    if (opts.contexts) await this.option(Option.SET_META_CONTEXT, encodeMetaContextRequest({ exportName, queries: opts.contexts }));
    return this.option(Option.GO, encodeGo({ exportName, infoRequests: [Info.BLOCK_SIZE] }));
  }

  request(r: Partial<Request> & { type: number }, payload?: Buffer): void {
    this.write(encodeRequest({ flags: 0, cookie: 1n, offset: 0, length: payload?.length ?? 0, ...r }));
    if (payload) this.write(payload);
  }

  /** One simple reply (without its READ data) or one structured chunk with its payload. */
  async reply(): Promise<Reply> {
    const h = await this.reader.read(SIMPLE_REPLY_BYTES);
    if (h.readUInt32BE(0) === SIMPLE_REPLY_MAGIC) return { kind: 'simple', error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8) };
    const c = decodeChunkHeader(Buffer.concat([h, await this.reader.read(4)]));
    return { kind: 'chunk', ...c, payload: await this.reader.read(c.length) };
  }

  /** Resolves true when the peer closes the connection (anything it still sends is dropped). */
  async closed(): Promise<boolean> {
    try {
      for (;;) await this.reader.read(1);
    } catch {
      return true;
    }
  }
}

/** A disk in memory, for server tests that need no file. */
export class MemoryBackend implements NbdBackend {
  readonly data: Buffer;
  constructor(
    readonly size: number,
    readonly extra: Partial<NbdBackend> = {},
  ) {
    this.data = Buffer.alloc(size);
  }
  get readOnly() {
    return this.extra.readOnly;
  }
  get blockSizes() {
    return this.extra.blockSizes;
  }
  async read(offset: number, length: number): Promise<Buffer> {
    return Buffer.from(this.data.subarray(offset, offset + length));
  }
  async write(offset: number, data: Buffer): Promise<void> {
    data.copy(this.data, offset);
  }
  async flush(): Promise<void> {}
  async trim(): Promise<void> {}
}
