// Framing of the VM control protocol (CONTROL-PROTOCOL.md): newline-delimited JSON objects, each
// optionally followed by exactly `attachment` raw bytes. The same parser reads both directions.
// It never throws on input: every malformed frame becomes an error event, and it stays in sync
// whenever the framing allows it (a too-long line is skipped to its newline, an oversize
// attachment is skipped byte for byte).

export const PROTOCOL_VERSION = 1;
export const MAX_LINE_BYTES = 1 << 20;
export const MAX_ATTACHMENT_BYTES = 64 << 20;
const NL = 0x0a;

export type JsonObject = Record<string, unknown>;

export type FrameEvent =
  | { type: 'frame'; json: JsonObject; attachment: Buffer | null }
  | { type: 'error'; errorClass: 'ParseError' | 'LineTooLong' | 'AttachmentTooLarge'; desc: string; id: unknown };

export interface ParserLimits {
  maxLineBytes?: number;
  maxAttachmentBytes?: number;
}

type Mode =
  | { kind: 'line' }
  | { kind: 'discard-line' }
  | { kind: 'attachment'; json: JsonObject; buf: Buffer; filled: number }
  | { kind: 'skip'; remaining: number };

export class FrameParser {
  private readonly maxLine: number;
  private readonly maxAttachment: number;
  private mode: Mode = { kind: 'line' };
  private lineParts: Buffer[] = [];
  private lineLength = 0;

  constructor(limits: ParserLimits = {}) {
    this.maxLine = limits.maxLineBytes ?? MAX_LINE_BYTES;
    this.maxAttachment = limits.maxAttachmentBytes ?? MAX_ATTACHMENT_BYTES;
  }

  /** Attachment bytes (kept or skipped) the parser still expects before the next line. */
  get pendingBytes(): number {
    const m = this.mode;
    return m.kind === 'attachment' ? m.buf.length - m.filled : m.kind === 'skip' ? m.remaining : 0;
  }

  /** Feeds bytes in any chunking; returns the frames and errors completed by them, in order. */
  push(chunk: Buffer): FrameEvent[] {
    const out: FrameEvent[] = [];
    let pos = 0;
    while (pos < chunk.length) {
      const mode = this.mode;
      switch (mode.kind) {
        case 'attachment': {
          const n = Math.min(chunk.length - pos, mode.buf.length - mode.filled);
          chunk.copy(mode.buf, mode.filled, pos, pos + n);
          mode.filled += n;
          pos += n;
          if (mode.filled === mode.buf.length) {
            out.push({ type: 'frame', json: mode.json, attachment: mode.buf });
            this.mode = { kind: 'line' };
          }
          break;
        }
        case 'skip': {
          const n = Math.min(chunk.length - pos, mode.remaining);
          mode.remaining -= n;
          pos += n;
          if (mode.remaining === 0) this.mode = { kind: 'line' };
          break;
        }
        case 'discard-line': {
          const nl = chunk.indexOf(NL, pos);
          if (nl < 0) return out;
          pos = nl + 1;
          this.mode = { kind: 'line' };
          break;
        }
        case 'line': {
          const nl = chunk.indexOf(NL, pos);
          const end = nl < 0 ? chunk.length : nl;
          if (this.lineLength + (end - pos) > this.maxLine) {
            out.push({
              type: 'error',
              errorClass: 'LineTooLong',
              desc: `a JSON line may be at most ${this.maxLine} bytes: send large data as an attachment`,
              id: null,
            });
            this.lineParts = [];
            this.lineLength = 0;
            if (nl < 0) {
              this.mode = { kind: 'discard-line' };
              return out;
            }
            pos = nl + 1;
            break;
          }
          if (nl < 0) {
            this.lineParts.push(chunk.subarray(pos));
            this.lineLength += chunk.length - pos;
            return out;
          }
          const part = chunk.subarray(pos, nl);
          const line = this.lineParts.length ? Buffer.concat([...this.lineParts, part]) : part;
          this.lineParts = [];
          this.lineLength = 0;
          pos = nl + 1;
          this.onLine(line, out);
          break;
        }
      }
    }
    return out;
  }

  private onLine(line: Buffer, out: FrameEvent[]): void {
    let end = line.length;
    if (end > 0 && line[end - 1] === 0x0d) end--; // tolerate CRLF
    let text = line.toString('utf8', 0, end);
    text = text.trim();
    if (text === '') return;
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      out.push({
        type: 'error',
        errorClass: 'ParseError',
        desc: `invalid JSON (${(e as Error).message}): send one JSON object per line`,
        id: null,
      });
      return;
    }
    if (json === null || typeof json !== 'object' || Array.isArray(json)) {
      out.push({ type: 'error', errorClass: 'ParseError', desc: 'each line must be a JSON object', id: null });
      return;
    }
    const obj = json as JsonObject;
    const id = Object.hasOwn(obj, 'id') ? obj.id : null;
    if (!Object.hasOwn(obj, 'attachment')) {
      out.push({ type: 'frame', json: obj, attachment: null });
      return;
    }
    const size = obj.attachment;
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
      // We cannot know how many bytes follow; what does is read as lines (and most likely refused).
      out.push({
        type: 'error',
        errorClass: 'ParseError',
        desc: `"attachment" must be the byte length of the data that follows (an integer >= 0), got ${JSON.stringify(size)}`,
        id,
      });
      return;
    }
    if (size > this.maxAttachment) {
      out.push({
        type: 'error',
        errorClass: 'AttachmentTooLarge',
        desc: `attachment of ${size} bytes exceeds the limit of ${this.maxAttachment}: split the data over several commands`,
        id,
      });
      if (size > 0) this.mode = { kind: 'skip', remaining: size };
      return;
    }
    if (size === 0) {
      out.push({ type: 'frame', json: obj, attachment: Buffer.alloc(0) });
      return;
    }
    this.mode = { kind: 'attachment', json: obj, buf: Buffer.allocUnsafe(size), filled: 0 };
  }
}

/** Encodes one frame: the JSON line (with "attachment" set when data is given) and the data. */
export function encodeFrame(json: JsonObject, attachment?: Buffer | null): Buffer[] {
  const obj = attachment ? { ...json, attachment: attachment.length } : json;
  const line = Buffer.from(`${JSON.stringify(obj)}\n`);
  return attachment && attachment.length ? [line, attachment] : [line];
}
