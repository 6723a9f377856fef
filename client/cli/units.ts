// Sizes and rates as people type them: 1GiB, 256MiB, 64KiB, 100MiB/s, 1Gbit/s.
import { InvalidArgumentError } from 'commander';

const BINARY: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };
const DECIMAL: Record<string, number> = { '': 1, k: 1e3, m: 1e6, g: 1e9, t: 1e12 };

/**
 * Bytes in a size: a number with an optional unit. KiB/MiB/GiB/TiB and the bare K/M/G/T are powers
 * of 1024 (as in qemu-img), KB/MB/GB/TB powers of 1000. The result must be a whole number of bytes.
 */
export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)$/i.exec(text.trim());
  if (!m || (m[3] && !m[2])) throw new InvalidArgumentError(`expected a size such as 1GiB, 256MiB or 4096 (got ${JSON.stringify(text)})`);
  const [, num, prefix, i, b] = m;
  const decimal = prefix !== '' && i === '' && b !== '';
  const bytes = Number(num) * (decimal ? DECIMAL : BINARY)[prefix.toLowerCase()];
  if (!Number.isSafeInteger(bytes)) throw new InvalidArgumentError(`${text} is not a whole number of bytes`);
  return bytes;
}

/** A size that must be a positive multiple of `unit` bytes (what, e.g. "512-byte sectors"). */
export function sizeMultipleOf(unit: number, what: string): (text: string) => number {
  return (text) => {
    const bytes = parseSize(text);
    if (bytes <= 0 || bytes % unit !== 0) throw new InvalidArgumentError(`${text} is not a whole number of ${what} (${unit} bytes)`);
    return bytes;
  };
}

/**
 * Bytes per second in a rate: a size per second (100MiB/s, 10MB/s) or bits per second (1Gbit/s,
 * 500Mbit/s, 100Mbps; decimal prefixes, divided by 8). "unlimited" gives null.
 */
export function parseRate(text: string): number | null {
  const t = text.trim();
  if (/^(unlimited|none|off)$/i.test(t)) return null;
  // Bits are spelled with a lower-case b: 1Gbit/s, 100Mbps, 100Mb/s (but 100MB/s is bytes).
  const bits = /^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:bit\/s|bit|bps|b\/s)$/.exec(t);
  let bytes: number;
  if (bits) {
    bytes = (Number(bits[1]) * DECIMAL[bits[2].toLowerCase()]) / 8;
  } else {
    try {
      bytes = parseSize(t.replace(/\/s$/i, '').replace(/ps$/, ''));
    } catch {
      throw new InvalidArgumentError(`expected a rate such as 100MiB/s, 1Gbit/s or unlimited (got ${JSON.stringify(text)})`);
    }
  }
  if (!(bytes >= 1)) throw new InvalidArgumentError(`${text} is not a positive rate (use "unlimited" for no limit)`);
  return Math.floor(bytes);
}

export function parseCount(what: string, min = 0): (text: string) => number {
  return (text) => {
    const n = Number(text);
    if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(n) || n < min) throw new InvalidArgumentError(`${what} must be a whole number >= ${min} (got ${JSON.stringify(text)})`);
    return n;
  };
}
