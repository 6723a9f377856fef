// QMP's framing and session rules: newline-delimited JSON, the greeting, capability negotiation
// (`qmp_capabilities` before any other command), and ids that pair replies with commands.
import { QmpProtocolError } from './errors';
import { classify, preview, type QmpCommand, type QmpServerMessage } from './messages';

/** A message longer than this is a broken peer (query-qmp-schema, the largest reply, is well under 1 MiB). */
export const MAX_LINE_BYTES = 64 << 20;
export const CAPABILITIES_COMMAND = 'qmp_capabilities';

/** Splits a byte stream into lines (QEMU ends each with CRLF); a partial line waits for the rest. */
export class LineSplitter {
  private partial: Buffer[] = [];
  private partialBytes = 0;

  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    let start = 0;
    for (let nl = chunk.indexOf(0x0a); nl >= 0; nl = chunk.indexOf(0x0a, start)) {
      const piece = chunk.subarray(start, nl);
      const line = this.partialBytes > 0 ? Buffer.concat([...this.partial, piece]) : piece;
      this.partial = [];
      this.partialBytes = 0;
      lines.push(line.toString('utf8').replace(/\r$/, ''));
      start = nl + 1;
    }
    if (start < chunk.length) {
      this.partial.push(chunk.subarray(start));
      this.partialBytes += chunk.length - start;
      if (this.partialBytes > MAX_LINE_BYTES) throw new QmpProtocolError(`QEMU sent a QMP line longer than ${MAX_LINE_BYTES} bytes`);
    }
    return lines;
  }
}

/** One line of QEMU's output as a message; blank lines are nothing. */
export function decodeLine(line: string): QmpServerMessage | null {
  return line.trim() === '' ? null : classify(parseLine(line));
}

export function parseLine(line: string): unknown {
  try {
    return JSON.parse(line);
  } catch {
    throw new QmpProtocolError(`QEMU sent a QMP line that is not JSON: ${preview(line)}`);
  }
}

export function encodeCommand(cmd: QmpCommand): string {
  return `${JSON.stringify(cmd)}\n`;
}

/** Ids are strings unique within a session: `ferry-1`, `ferry-2`, ... */
export class CommandIds {
  private next = 1;
  take(): string {
    return `ferry-${this.next++}`;
  }
}
