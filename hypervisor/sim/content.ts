// The guest's block contents: a pure function of (vmId, block, version). Version 0 is all zeros (the
// block was never written, as on a fresh sparse image). Any other version is a xorshift128 stream
// seeded from a hash of the triple: a few microseconds per 4 KiB block, nothing cached.
// Words are stored little-endian (the byte order of every platform Node supports).

export const GUEST_BLOCK_BYTES = 4096;
const WORDS = GUEST_BLOCK_BYTES / 4;
const TWO32 = 0x1_0000_0000;

/** murmur3 finalizer: a good 32-bit mixer. */
export function mix32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}

/** FNV-1a over the UTF-16 code units. */
export function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** Hash of a non-negative integer up to 2^53 together with a 32-bit key. */
export function mixIndex(key: number, index: number): number {
  const lo = index >>> 0;
  const hi = Math.floor(index / TWO32) >>> 0;
  return mix32(mix32(key ^ lo) ^ Math.imul(hi, 0x9e3779b1) ^ 0x5bd1e995);
}

/**
 * Writes the content of (vm, block, version) into `out` (at least `length` words are used; the last
 * guest block of a disk may be shorter than 4 KiB, the caller takes only the bytes it needs).
 */
export function fillBlockWords(out: Uint32Array, vmHash: number, block: number, version: number): void {
  if (version === 0) {
    out.fill(0, 0, WORDS);
    return;
  }
  const k = mixIndex(vmHash, block);
  let a = mix32(k ^ version) | 1;
  let b = mix32(a ^ 0x6a09e667);
  let c = mix32(b ^ 0xbb67ae85);
  let d = mix32(c ^ Math.imul(version, 0x3c6ef372));
  for (let i = 0; i < WORDS; i++) {
    const t = a ^ (a << 11);
    a = b;
    b = c;
    c = d;
    d = d ^ (d >>> 19) ^ (t ^ (t >>> 8));
    out[i] = d;
  }
}

/** Content of one guest block as a fresh Buffer of `length` bytes (default a whole block). */
export function blockContent(vmId: string, block: number, version: number, length = GUEST_BLOCK_BYTES): Buffer {
  const words = new Uint32Array(WORDS);
  fillBlockWords(words, hashString(vmId), block, version);
  return Buffer.from(words.buffer, 0, length);
}
