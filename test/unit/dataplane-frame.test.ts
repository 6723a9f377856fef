import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { FUZZ_SEED, boundedRun, chunkSizes, chunked, mutated, randomBytes as randomInput, resealedFrames, spliced } from '../support/fuzz';
import { DataPlaneError } from '../../dataplane/api';
import {
  decodeMeta,
  encodeFrame,
  encodeMeta,
  Flags,
  FrameDecoder,
  FrameKind,
  HEADER_BYTES,
  MAX_DATA_BYTES,
  MAX_META_BYTES,
  sealFrame,
  writeHeader,
  type Frame,
  type HeaderFields,
  type OutFrame,
} from '../../dataplane/frame';

const TAG = 0x1234abcd;

function bytes(f: OutFrame): Buffer {
  return Buffer.concat(encodeFrame(f));
}

/** A frame built field by field, with valid checksums unless told otherwise. */
function raw(h: Partial<HeaderFields>, meta = Buffer.alloc(0), data = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(HEADER_BYTES + meta.length);
  writeHeader(head, { kind: FrameKind.MSG, flags: 0, tag: TAG, seq: 1, type: 1, metaLength: meta.length, dataLength: data.length, ...h });
  meta.copy(head, HEADER_BYTES);
  sealFrame(head, data);
  return Buffer.concat([head, data]);
}

function decodeAll(buf: Buffer, chunkSizes?: () => number, expectedTag: number | null = TAG): Frame[] {
  const d = new FrameDecoder({ expectedTag });
  const out: Frame[] = [];
  if (!chunkSizes) return d.push(buf);
  for (let i = 0; i < buf.length; ) {
    const n = Math.max(1, Math.min(buf.length - i, chunkSizes()));
    out.push(...d.push(buf.subarray(i, i + n)));
    i += n;
  }
  return out;
}

function errorCode(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DataPlaneError);
    return (err as DataPlaneError).code;
  }
  throw new Error('expected a DataPlaneError');
}

describe('frame encoding', () => {
  it('round-trips every field, meta and data', () => {
    const data = randomBytes(1000);
    const meta = encodeMeta({ offset: 65536, block: 1 });
    const [f] = decodeAll(bytes({ kind: FrameKind.MSG, tag: TAG, seq: 2 ** 40 + 7, type: 513, meta, data }));
    expect(f.kind).toBe(FrameKind.MSG);
    expect(f.tag).toBe(TAG);
    expect(f.seq).toBe(2 ** 40 + 7);
    expect(f.type).toBe(513);
    expect(f.flags).toBe(0);
    expect(decodeMeta(f.meta)).toEqual({ offset: 65536, block: 1 });
    expect(f.data.equals(data)).toBe(true);
  });

  it('sends zero payloads as a flag and a length only', () => {
    const parts = encodeFrame({ kind: FrameKind.MSG, tag: TAG, seq: 1, type: 1, data: Buffer.alloc(65536), zero: true });
    expect(parts).toHaveLength(1);
    expect(parts[0].length).toBe(HEADER_BYTES);
    const [f] = decodeAll(parts[0]);
    expect(f.flags & Flags.ZERO).toBe(Flags.ZERO);
    expect(f.data.length).toBe(65536);
    expect(f.data.every((b) => b === 0)).toBe(true);
  });

  it('keeps the payload out of the header buffer (no copy)', () => {
    const data = randomBytes(4096);
    const parts = encodeFrame({ kind: FrameKind.MSG, tag: TAG, seq: 1, type: 1, data });
    expect(parts[1]).toBe(data);
  });

  it('decodes a stream split into arbitrary chunks, including single bytes', () => {
    const frames: Buffer[] = [];
    const datas: Buffer[] = [];
    for (let i = 0; i < 200; i++) {
      const data = i % 7 === 0 ? Buffer.alloc(0) : randomBytes(Math.floor(Math.random() * 70_000));
      datas.push(data);
      frames.push(bytes({ kind: FrameKind.MSG, tag: TAG, seq: i + 1, type: 1, meta: encodeMeta({ i }), data }));
    }
    const stream = Buffer.concat(frames);
    const cases: [Buffer, () => number][] = [
      [Buffer.concat(frames.slice(0, 15)), () => 1],
      [stream, () => 7],
      [stream, () => 1 + Math.floor(Math.random() * 100_000)],
      [stream, () => 65536],
    ];
    for (const [input, sizes] of cases) {
      const out = decodeAll(input, sizes);
      expect(out).toHaveLength(input === stream ? 200 : 15);
      out.forEach((f, i) => {
        expect(f.seq).toBe(i + 1);
        expect(decodeMeta(f.meta)).toEqual({ i });
        expect(f.data.equals(datas[i])).toBe(true);
      });
    }
  });

  it('refuses to encode oversized meta or data', () => {
    expect(errorCode(() => encodeFrame({ kind: FrameKind.MSG, tag: 0, seq: 1, meta: Buffer.alloc(MAX_META_BYTES + 1) }))).toBe('too_large');
    expect(errorCode(() => encodeFrame({ kind: FrameKind.MSG, tag: 0, seq: 1, data: Buffer.alloc(MAX_DATA_BYTES + 1) }))).toBe('too_large');
  });
});

describe('frame decoder errors', () => {
  const good = (): Buffer => bytes({ kind: FrameKind.MSG, tag: TAG, seq: 5, type: 1, meta: encodeMeta({ a: 1 }), data: randomBytes(100) });

  it('bad_magic, as soon as four bytes arrived', () => {
    expect(errorCode(() => new FrameDecoder().push(Buffer.from('GET / HTTP/1.1\r\n')))).toBe('bad_magic');
    expect(errorCode(() => new FrameDecoder().push(Buffer.from('GET ')))).toBe('bad_magic');
  });

  it('bad_version', () => {
    expect(errorCode(() => decodeAll(raw({ version: 2 })))).toBe('bad_version');
  });

  it('bad_checksum for a flipped payload, meta or header byte', () => {
    for (const pos of [HEADER_BYTES + 3, HEADER_BYTES + 12, 10, 25, 30, 33, 38]) {
      const b = good();
      b[pos] ^= 0x40;
      expect(errorCode(() => decodeAll(b))).toBe('bad_checksum');
    }
  });

  it('bad_checksum on a corrupted length field, without waiting for the claimed body', () => {
    const b = good();
    b[28] ^= 0x10; // data length grows by 256 MiB
    expect(errorCode(() => decodeAll(b.subarray(0, HEADER_BYTES)))).toBe('bad_checksum');
  });

  it('too_large for declared lengths over the limits, before any allocation', () => {
    expect(errorCode(() => decodeAll(raw({ metaLength: MAX_META_BYTES + 1 }).subarray(0, HEADER_BYTES)))).toBe('too_large');
    expect(errorCode(() => decodeAll(raw({ dataLength: 0xffffffff }).subarray(0, HEADER_BYTES)))).toBe('too_large');
    expect(errorCode(() => decodeAll(raw({ dataLength: MAX_DATA_BYTES + 1, flags: Flags.ZERO })))).toBe('too_large');
    const d = new FrameDecoder({ maxMetaBytes: 4096, maxDataBytes: 0 });
    expect(errorCode(() => d.push(raw({}, Buffer.alloc(0), Buffer.alloc(1))))).toBe('too_large');
  });

  it('bad_tag for a frame of another session; ERROR frames may carry tag 0', () => {
    expect(errorCode(() => decodeAll(raw({ tag: TAG + 1 })))).toBe('bad_tag');
    expect(decodeAll(raw({ tag: 0, kind: FrameKind.ERROR }))).toHaveLength(1);
    expect(errorCode(() => decodeAll(raw({ tag: 0, kind: FrameKind.MSG })))).toBe('bad_tag');
    expect(decodeAll(raw({ tag: 99 }), undefined, null)).toHaveLength(1);
  });

  it('bad_kind, bad_flags, bad_header', () => {
    expect(errorCode(() => decodeAll(raw({ kind: 0 })))).toBe('bad_kind');
    expect(errorCode(() => decodeAll(raw({ kind: 200 })))).toBe('bad_kind');
    expect(errorCode(() => decodeAll(raw({ flags: 0x8000 })))).toBe('bad_flags');
    expect(errorCode(() => decodeAll(raw({ reserved: 1 })))).toBe('bad_header');
    expect(errorCode(() => decodeAll(raw({ seq: 2 ** 60 })))).toBe('bad_header');
  });

  it('bad_meta for meta that is not a JSON object', () => {
    expect(errorCode(() => decodeMeta(Buffer.from('{')))).toBe('bad_meta');
    expect(errorCode(() => decodeMeta(Buffer.from('[1]')))).toBe('bad_meta');
    expect(errorCode(() => decodeMeta(Buffer.from('null')))).toBe('bad_meta');
    expect(decodeMeta(Buffer.alloc(0))).toEqual({});
  });

  it('stays failed after an error', () => {
    const d = new FrameDecoder({ expectedTag: TAG });
    const b = good();
    b[HEADER_BYTES + 20] ^= 1;
    expect(errorCode(() => d.push(b))).toBe('bad_checksum');
    expect(errorCode(() => d.push(good()))).toBe('bad_checksum');
  });

  it('returns the good frames before a bad one, and nothing of the bad one', () => {
    const bad = good();
    bad[HEADER_BYTES + 50] ^= 1;
    const d = new FrameDecoder({ expectedTag: TAG });
    expect(d.push(good())).toHaveLength(1);
    expect(errorCode(() => d.push(bad))).toBe('bad_checksum');
  });
});

describe(`frame decoder fuzz (fast-check, seed ${FUZZ_SEED})`, () => {
  const valid: Buffer[] = Array.from({ length: 13 }, (_, i) =>
    bytes({
      kind: (i + 1) as OutFrame['kind'],
      tag: TAG,
      seq: i,
      type: i,
      meta: i % 3 ? encodeMeta({ i, s: 'x'.repeat(i * 10) }) : undefined,
      data: i % 4 === 0 ? Buffer.alloc(3000) : Buffer.alloc(i * 300, i),
      zero: i % 4 === 0,
    }),
  );
  const LIMITS = { maxMetaBytes: 4096, maxDataBytes: 64 * 1024 };
  const hostile = fc.oneof(randomInput, mutated(valid), resealedFrames(valid), spliced(fc.oneof(fc.constantFrom(...valid), mutated(valid))));

  /** The largest buffer allocated while `fn` runs (Buffer.alloc/allocUnsafe, which the decoder uses). */
  function largestAllocation(fn: () => void): number {
    const { alloc, allocUnsafe } = Buffer;
    let largest = 0;
    Buffer.alloc = ((n: number, ...rest: never[]) => ((largest = Math.max(largest, n)), alloc.call(Buffer, n, ...rest))) as typeof Buffer.alloc;
    Buffer.allocUnsafe = ((n: number) => ((largest = Math.max(largest, n)), allocUnsafe.call(Buffer, n))) as typeof Buffer.allocUnsafe;
    try {
      fn();
    } finally {
      Buffer.alloc = alloc;
      Buffer.allocUnsafe = allocUnsafe;
    }
    return largest;
  }

  it('random and mutated streams: only DataPlaneError, no allocation past the limits, nothing held past the input (~3 s)', () => {
    let runs = 0;
    const codes = new Map<string, number>();
    fc.assert(
      fc.property(hostile, chunkSizes, fc.boolean(), (input, sizes, tagged) => {
        runs++;
        const d = new FrameDecoder({ expectedTag: tagged ? TAG : null, ...LIMITS });
        const largest = largestAllocation(() => {
          try {
            for (const chunk of chunked(input, sizes)) {
              for (const f of d.push(chunk)) {
                expect(f.meta.length).toBeLessThanOrEqual(LIMITS.maxMetaBytes);
                expect(f.data.length).toBeLessThanOrEqual(LIMITS.maxDataBytes);
              }
            }
            expect(d.pendingBytes).toBeLessThanOrEqual(input.length);
          } catch (err) {
            if (!(err instanceof DataPlaneError)) throw err;
            codes.set(err.code, (codes.get(err.code) ?? 0) + 1);
          }
        });
        // A declared length is believed only up to the limits: a hostile header cannot make us allocate more.
        expect(largest).toBeLessThanOrEqual(Math.max(input.length, LIMITS.maxDataBytes + LIMITS.maxMetaBytes));
      }),
      boundedRun(3000),
    );
    expect(runs).toBeGreaterThanOrEqual(300);
    // Each layer of checks was reached, not only the first.
    expect([...codes.keys()]).toEqual(expect.arrayContaining(['bad_magic', 'bad_version', 'bad_checksum', 'too_large', 'bad_kind', 'bad_flags', 'bad_tag']));
  });

  it('valid frames round-trip under any chunking', () => {
    const frame = fc.record({
      kind: fc.integer({ min: 1, max: 13 }),
      tag: fc.nat(0xffffffff),
      seq: fc.maxSafeNat(),
      type: fc.nat(0xffff),
      meta: fc.option(fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 2 }), { maxKeys: 4 }), { nil: undefined }),
      data: fc.uint8Array({ maxLength: 5000 }).map((b) => Buffer.from(b)),
    });
    fc.assert(
      fc.property(fc.array(frame, { minLength: 1, maxLength: 5 }), chunkSizes, (frames, sizes) => {
        const stream = Buffer.concat(frames.map((f) => bytes({ ...f, kind: f.kind as OutFrame['kind'], meta: encodeMeta(f.meta), zero: f.data.length > 0 && f.data.every((b) => b === 0) })));
        const d = new FrameDecoder();
        const out = chunked(stream, sizes).flatMap((c) => d.push(c));
        expect(out.map((f) => [f.kind, f.tag, f.seq, f.type, decodeMeta(f.meta), f.data.toString('hex')])).toEqual(
          frames.map((f) => [f.kind, f.tag, f.seq, f.type, JSON.parse(JSON.stringify(f.meta ?? {})), f.data.toString('hex')]),
        );
        expect(d.pendingBytes).toBe(0);
      }),
      { seed: FUZZ_SEED, numRuns: 300 },
    );
  });
});
