// The client's side of the fixed newstyle handshake: structured replies, metadata contexts, then
// NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME for a server that does not know GO).
import type { Writable } from 'node:stream';
import type { ByteReader } from './byte-reader';
import { NbdConnectError, NbdOptionError, NbdProtocolError } from './errors';
import {
  ClientFlag,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOptionReplyHeader,
  DEFAULT_MAX_PAYLOAD,
  encodeGo,
  encodeMetaContextRequest,
  encodeOption,
  encodeString,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  CLISERV_MAGIC,
  Option,
  OPTION_REPLY_HEADER_BYTES,
  optionName,
  Rep,
  repName,
  TransmissionFlag,
  readU64,
  type BlockSizes,
} from './protocol';

export interface HandshakeOptions {
  exportName: string;
  metaContexts: string[];
  structuredReplies: boolean;
}

export interface ExportInfo {
  size: number;
  flags: number;
  /** The server's constraints; the defaults of the spec when it sent none. */
  blockSizes: BlockSizes;
  structuredReplies: boolean;
  /** Context name to the id the server gave it. */
  contexts: Map<string, number>;
  description?: string;
}

/** Largest option reply Ferry reads (QEMU's limit too); larger is a broken or hostile server. */
const MAX_OPTION_REPLY = 32 << 20;

interface OptionReply {
  type: number;
  data: Buffer;
}

export async function negotiate(out: Writable, reader: ByteReader, opts: HandshakeOptions): Promise<ExportInfo> {
  const greeting = await reader.read(18);
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdConnectError('the peer is not an NBD server (no NBDMAGIC in its greeting)');
  const magic = greeting.readBigUInt64BE(8);
  if (magic === CLISERV_MAGIC) throw new NbdConnectError('the server speaks oldstyle NBD negotiation; Ferry needs fixed newstyle (qemu-nbd without --old-style, nbd-server >= 3.10)');
  if (magic !== IHAVEOPT) throw new NbdProtocolError(`the server's second magic is 0x${magic.toString(16)}, not IHAVEOPT`);
  const handshakeFlags = greeting.readUInt16BE(16);
  if (!(handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE)) throw new NbdConnectError('the server does not offer fixed newstyle negotiation, which Ferry needs');
  const noZeroes = (handshakeFlags & HandshakeFlag.NO_ZEROES) !== 0;
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0));
  out.write(clientFlags);

  const option = async (opt: number, data?: Buffer): Promise<OptionReply> => {
    out.write(encodeOption(opt, data));
    return nextReply(reader, opt);
  };
  const fail = async (opt: number, reply: OptionReply, what: string): Promise<never> => {
    const message = reply.data.toString('utf8');
    out.write(encodeOption(Option.ABORT));
    throw new NbdOptionError(`${what}: the server answered ${optionName(opt)} with ${repName(reply.type)}${message ? ` (${message})` : ''}`, repName(reply.type), message);
  };

  let structuredReplies = false;
  if (opts.structuredReplies) {
    const r = await option(Option.STRUCTURED_REPLY);
    if (r.type === Rep.ACK) structuredReplies = true;
    else if (r.type !== Rep.ERR_UNSUP) await fail(Option.STRUCTURED_REPLY, r, 'structured replies');
  }

  const contexts = new Map<string, number>();
  if (opts.metaContexts.length > 0) {
    if (!structuredReplies) {
      out.write(encodeOption(Option.ABORT));
      throw new NbdConnectError(`the server has no structured replies, so no metadata contexts (${opts.metaContexts.join(', ')}) and no NBD_CMD_BLOCK_STATUS`);
    }
    out.write(encodeOption(Option.SET_META_CONTEXT, encodeMetaContextRequest({ exportName: opts.exportName, queries: opts.metaContexts })));
    for (;;) {
      const r = await nextReply(reader, Option.SET_META_CONTEXT);
      if (r.type === Rep.ACK) break;
      if (r.type !== Rep.META_CONTEXT) await fail(Option.SET_META_CONTEXT, r, `metadata contexts ${opts.metaContexts.join(', ')} of export '${opts.exportName}'`);
      const { id, name } = decodeMetaContextReply(r.data);
      contexts.set(name, id);
    }
    const missing = opts.metaContexts.filter((c) => !contexts.has(c));
    if (missing.length > 0) {
      out.write(encodeOption(Option.ABORT));
      throw new NbdConnectError(
        `the server did not select metadata context ${missing.join(', ')} on export '${opts.exportName}' (for qemu:dirty-bitmap:NAME, export the bitmap with the export: block-export-add bitmaps: [NAME])`,
      );
    }
  }

  let size: number | null = null;
  let flags = 0;
  let blockSizes: BlockSizes | null = null;
  let description: string | undefined;
  out.write(encodeOption(Option.GO, encodeGo({ exportName: opts.exportName, infoRequests: [Info.BLOCK_SIZE, Info.DESCRIPTION] })));
  for (;;) {
    const r = await nextReply(reader, Option.GO);
    if (r.type === Rep.ACK) break;
    if (r.type === Rep.ERR_UNSUP) return exportName(out, reader, opts, noZeroes, structuredReplies, contexts);
    if (r.type !== Rep.INFO) {
      const hint = r.type === Rep.ERR_UNKNOWN ? ' (check the export name; qemu-nbd takes it with -x, QEMU with block-export-add name)' : '';
      await fail(Option.GO, r, `export '${opts.exportName}'${hint}`);
    }
    const info = decodeInfoReply(r.data);
    if (info.type === Info.EXPORT) [size, flags] = [info.size, info.flags];
    else if (info.type === Info.BLOCK_SIZE) blockSizes = info.sizes;
    else if (info.type === Info.DESCRIPTION) description = info.description;
  }
  if (size === null) throw new NbdProtocolError('the server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT');
  return { size, flags: checkFlags(flags), blockSizes: blockSizes ?? defaultBlockSizes(), structuredReplies, contexts, description };
}

async function exportName(out: Writable, reader: ByteReader, opts: HandshakeOptions, noZeroes: boolean, structuredReplies: boolean, contexts: Map<string, number>): Promise<ExportInfo> {
  out.write(encodeOption(Option.EXPORT_NAME, encodeString(opts.exportName, 'the export name')));
  const reply = await reader.read(10).catch(() => {
    throw new NbdConnectError(`the server closed the connection on NBD_OPT_EXPORT_NAME: it has no export '${opts.exportName}'`);
  });
  if (!noZeroes) await reader.skip(124);
  return { size: readU64(reply, 0, 'the export size'), flags: checkFlags(reply.readUInt16BE(8)), blockSizes: defaultBlockSizes(), structuredReplies, contexts };
}

const defaultBlockSizes = (): BlockSizes => ({ minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_PAYLOAD });

function checkFlags(flags: number): number {
  if (!(flags & TransmissionFlag.HAS_FLAGS)) throw new NbdProtocolError(`transmission flags 0x${flags.toString(16)} lack NBD_FLAG_HAS_FLAGS`);
  return flags;
}

async function nextReply(reader: ByteReader, opt: number): Promise<OptionReply> {
  const h = decodeOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_BYTES));
  if (h.option !== opt) throw new NbdProtocolError(`the server answered ${optionName(h.option)} while ${optionName(opt)} was asked`);
  if (h.length > MAX_OPTION_REPLY) throw new NbdProtocolError(`the server's ${repName(h.type)} reply to ${optionName(opt)} is ${h.length} bytes`);
  const data = await reader.read(h.length);
  if (h.type === Rep.ACK && h.length !== 0) throw new NbdProtocolError(`NBD_REP_ACK to ${optionName(opt)} carries ${h.length} bytes`);
  return { type: h.type, data };
}
