// The lines Ferry's guest program writes on its channel, parsed (guest/PROTOCOL.md).

export interface GuestCounters {
  /** Heartbeat sequence number (from 1 at boot; it lives in guest memory, so it goes on across a migration). */
  seq: number;
  ops: number;
  reads: number;
  writes: number;
  /** Memory pages memhog dirtied. */
  pages: number;
  violations: number;
  ioErrors: number;
  /** Longest disk I/O since boot (or the last io-reset), µs. */
  ioMaxUs: number;
  /** I/Os slower than ferry.slow_ms: count and their total time (µs). */
  slowIos: number;
  slowUs: number;
  /** How long the disk I/O in flight has waited so far (0 = none in flight), µs. */
  inflightUs: number;
}

const HEARTBEAT_FIELDS: readonly (keyof GuestCounters)[] = ['seq', 'ops', 'reads', 'writes', 'pages', 'violations', 'ioErrors', 'ioMaxUs', 'slowIos', 'slowUs', 'inflightUs'];

export interface GuestViolation {
  source: 'read' | 'verify';
  block: number;
  expected: number;
  /** A version number, or torn:V, misplaced:BLOCK:V, foreign, garbage (PROTOCOL.md). */
  found: string;
}

export type GuestLine =
  | { kind: 'heartbeat'; counters: GuestCounters }
  | { kind: 'violation'; violation: GuestViolation }
  | { kind: 'reply'; id: string; ok: true; fields: Record<string, string> }
  | { kind: 'reply'; id: string; ok: false; code: string; message: string }
  | { kind: 'ready'; fields: Record<string, string> }
  | { kind: 'io-error'; fields: Record<string, string>; text: string }
  | { kind: 'fatal'; message: string }
  | { kind: 'other'; text: string };

const DECIMAL = /^\d+$/;

export function parseGuestLine(line: string): GuestLine {
  const words = line.split(' ');
  switch (words[0]) {
    case 'H': {
      const values = words.slice(1);
      if (values.length !== HEARTBEAT_FIELDS.length || !values.every((v) => DECIMAL.test(v))) break;
      const counters = Object.fromEntries(HEARTBEAT_FIELDS.map((name, i) => [name, Number(values[i])])) as unknown as GuestCounters;
      return { kind: 'heartbeat', counters };
    }
    case 'V': {
      const f = fields(words.slice(1));
      if ((f.src !== 'read' && f.src !== 'verify') || !DECIMAL.test(f.block ?? '') || !DECIMAL.test(f.expected ?? '') || !f.found) break;
      return { kind: 'violation', violation: { source: f.src, block: Number(f.block), expected: Number(f.expected), found: f.found } };
    }
    case 'R': {
      const [, id, status, ...rest] = words;
      if (!id || (status !== 'ok' && status !== 'err')) break;
      if (status === 'ok') return { kind: 'reply', id, ok: true, fields: fields(rest) };
      return { kind: 'reply', id, ok: false, code: rest[0] ?? 'unknown', message: rest.slice(1).join(' ') };
    }
    case 'FERRY-READY':
      return { kind: 'ready', fields: fields(words.slice(1)) };
    case 'FERRY-FATAL':
      return { kind: 'fatal', message: words.slice(1).join(' ') };
    case 'E':
      if (words[1] === 'io-error') return { kind: 'io-error', fields: fields(words.slice(2)), text: line };
      break;
  }
  return { kind: 'other', text: line };
}

/** key=value words; words without '=' are skipped. */
function fields(words: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const w of words) {
    const eq = w.indexOf('=');
    if (eq > 0) out[w.slice(0, eq)] = w.slice(eq + 1);
  }
  return out;
}
