import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { ControlClient } from '../../hypervisor/control/client';
import { ControlServer, type CommandHandler } from '../../hypervisor/control/server';
import { HypervisorError } from '../../hypervisor/errors';
import { FrameParser, encodeFrame, type FrameEvent } from '../../hypervisor/control/protocol';
import fc from 'fast-check';
import { FUZZ_SEED, boundedRun, chunkSizes, chunked, mutated, randomBytes as randomInput, spliced } from '../support/fuzz';

// A small deterministic PRNG so a failing fuzz case can be reproduced from its seed.
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 0x1_0000_0000;
  };
}

function feedChunked(parser: FrameParser, data: Buffer, rand: () => number): FrameEvent[] {
  const out: FrameEvent[] = [];
  for (let pos = 0; pos < data.length; ) {
    const n = 1 + Math.floor(rand() * Math.min(64, data.length - pos));
    out.push(...parser.push(data.subarray(pos, pos + n)));
    pos += n;
  }
  return out;
}

const summarize = (evs: FrameEvent[]): unknown[] =>
  evs.map((e) => (e.type === 'frame' ? { json: e.json, att: e.attachment?.toString('hex') ?? null } : { err: e.errorClass, id: e.id }));

describe('FrameParser', () => {
  const stream = Buffer.concat([
    ...encodeFrame({ execute: 'query-status', id: 1 }),
    ...encodeFrame({ execute: 'write-pages', arguments: { first: 2 }, id: 2 }, Buffer.from('0a0b0c0a0d', 'hex')),
    Buffer.from('\r\n\n  \n'),
    ...encodeFrame({ event: 'BLOCK_NEEDED', data: { block: 9 } }),
    ...encodeFrame({ return: {}, id: 3 }, Buffer.alloc(0)),
  ]);

  it('parses frames with attachments (which may contain newlines) under any chunking', () => {
    const whole = summarize(new FrameParser().push(stream));
    expect(whole).toEqual([
      { json: { execute: 'query-status', id: 1 }, att: null },
      { json: { execute: 'write-pages', arguments: { first: 2 }, id: 2, attachment: 5 }, att: '0a0b0c0a0d' },
      { json: { event: 'BLOCK_NEEDED', data: { block: 9 } }, att: null },
      { json: { return: {}, id: 3, attachment: 0 }, att: '' },
    ]);
    for (let seed = 1; seed <= 200; seed++) {
      expect(summarize(feedChunked(new FrameParser(), stream, rng(seed)))).toEqual(whole);
    }
    const bytewise = new FrameParser();
    const evs: FrameEvent[] = [];
    for (const b of stream) evs.push(...bytewise.push(Buffer.from([b])));
    expect(summarize(evs)).toEqual(whole);
  });

  it('reports malformed lines and stays in sync', () => {
    const p = new FrameParser({ maxLineBytes: 100, maxAttachmentBytes: 10 });
    const input = Buffer.concat([
      Buffer.from('not json\n[1,2]\n"str"\n{"execute":"x","attachment":-1,"id":7}\n'),
      Buffer.from(`{"pad":"${'x'.repeat(200)}"}\n`),
      Buffer.from('{"execute":"big","attachment":20,"id":8}\n'),
      Buffer.alloc(20, 0x0a), // the oversize attachment's bytes are skipped, newlines and all
      Buffer.from('{"execute":"ok","id":9}\n'),
    ]);
    const evs = summarize(feedChunked(p, input, rng(5)));
    expect(evs).toEqual([
      { err: 'ParseError', id: null },
      { err: 'ParseError', id: null },
      { err: 'ParseError', id: null },
      { err: 'ParseError', id: 7 },
      { err: 'LineTooLong', id: null },
      { err: 'AttachmentTooLarge', id: 8 },
      { json: { execute: 'ok', id: 9 }, att: null },
    ]);
  });

  it(`fuzz (fast-check, seed ${FUZZ_SEED}): every event is a request object or a typed error, and the parser stays in sync (~3 s)`, () => {
    const valid = [
      { execute: 'read-pages', arguments: { first: 0, count: 1 }, id: 1 },
      { execute: 'query-status', id: 'x' },
      { return: { x: [1, 2, { y: null }] }, id: 3 },
    ].map((j) => Buffer.concat(encodeFrame(j)));
    valid.push(Buffer.concat(encodeFrame({ execute: 'load-state', id: 2 }, Buffer.from('{"a":1}\n'))));
    const lines = fc.jsonValue({ maxDepth: 3 }).map((v) => Buffer.from(`${JSON.stringify(v)}\n`));
    const hostile = fc.oneof(randomInput, mutated(valid), lines, spliced(fc.oneof(fc.constantFrom(...valid), mutated(valid), lines)));
    const ERRORS = ['ParseError', 'LineTooLong', 'AttachmentTooLarge'];
    let runs = 0;
    fc.assert(
      fc.property(hostile, chunkSizes, (input, sizes) => {
        runs++;
        const p = new FrameParser({ maxLineBytes: 4096, maxAttachmentBytes: 4096 });
        const events = chunked(input, sizes).flatMap((c) => p.push(c));
        for (const e of events) {
          if (e.type === 'frame') {
            expect(e.json !== null && typeof e.json === 'object' && !Array.isArray(e.json)).toBe(true);
            if (e.attachment === null) expect(Object.hasOwn(e.json, 'attachment')).toBe(false);
            else expect(e.attachment.length).toBe(e.json.attachment);
          } else {
            expect(ERRORS).toContain(e.errorClass);
            expect(e.desc.length).toBeGreaterThan(0);
          }
        }
        // Whatever came before, once the parser is between frames a valid frame parses. (A line still
        // open may announce an attachment, and an attachment or a skip in progress would swallow the
        // probe: end the line, then drain those.)
        const probe = encodeFrame({ execute: 'probe', id: 99 })[0];
        const ended = p.push(Buffer.from('\n'));
        const tail = [...ended, ...p.push(Buffer.alloc(p.pendingBytes, 0x0a)), ...p.push(probe)];
        expect(p.pendingBytes).toBe(0);
        expect(tail.some((e) => e.type === 'frame' && e.json.execute === 'probe')).toBe(true);
      }),
      boundedRun(3000),
    );
    expect(runs).toBeGreaterThanOrEqual(300);
  });
});

describe('ControlServer with a hostile client', () => {
  let dir: string;
  let server: ControlServer;
  let socketPath: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ctl-'));
    socketPath = path.join(dir, 'control.sock');
    const commands = new Map<string, CommandHandler>([
      ['echo', (args, att) => ({ ret: { args }, attachment: att ?? undefined })],
      [
        'need-int',
        (args) => {
          if (typeof args.n !== 'number') throw new HypervisorError('InvalidArgument', 'argument "n" must be a number');
          return { ret: { n: args.n } };
        },
      ],
      ['boom', () => Promise.reject(new Error('kaput'))],
    ]);
    server = new ControlServer('vm-x', commands, () => undefined);
    await server.listen(socketPath);
  });

  afterAll(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function rawExchange(input: Buffer, expectLines: number): Promise<Record<string, unknown>[]> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(socketPath);
      const parser = new FrameParser();
      const got: Record<string, unknown>[] = [];
      const done = (): void => {
        clearTimeout(timer);
        sock.destroy();
        resolve(got);
      };
      const timer = setTimeout(done, 3000);
      sock.on('data', (c: Buffer) => {
        for (const e of parser.push(c)) if (e.type === 'frame') got.push(e.json);
        if (got.length >= expectLines + 1) done();
      });
      sock.on('error', reject);
      sock.write(input);
    });
  }

  it('greets, answers errors with class and description, and keeps serving', async () => {
    const input = Buffer.concat([
      Buffer.from('{"execute":"nope","id":1}\n'),
      Buffer.from('{bad json\n'),
      Buffer.from('{"id":2}\n'),
      Buffer.from('{"execute":"need-int","id":3}\n'),
      Buffer.from('{"execute":"boom","id":4}\n'),
      Buffer.from('{"execute":"echo","arguments":[1],"id":5}\n'),
      Buffer.from('{"execute":"toString","id":6}\n'),
      Buffer.from('{"execute":"echo","id":7,"attachment":999999999}\n'),
    ]);
    const replies = await rawExchange(input, 8);
    expect(replies[0]).toEqual({ 'ferry-vm': { version: 1, vmId: 'vm-x', pid: process.pid } });
    const byId = new Map(replies.slice(1).map((r) => [r.id, r]));
    const cls = (id: unknown): unknown => (byId.get(id)?.error as { class: string } | undefined)?.class;
    expect(cls(1)).toBe('CommandNotFound');
    expect(cls(2)).toBe('ParseError');
    expect(cls(3)).toBe('InvalidArgument');
    expect(cls(4)).toBe('GenericError');
    expect(cls(5)).toBe('InvalidArgument');
    expect(cls(6)).toBe('CommandNotFound');
    expect(cls(7)).toBe('AttachmentTooLarge');
    expect(replies.filter((r) => r.id === null).length).toBe(1); // the bad JSON line
    for (const r of replies.slice(1)) expect(typeof (r.error as { desc: string }).desc).toBe('string');
  });

  it('survives a fuzzing client and still serves a well-behaved one, with attachments both ways', async () => {
    const rand = rng(99);
    const deadline = Date.now() + 1500;
    while (Date.now() < deadline) {
      const junk = Buffer.alloc(2000);
      for (let i = 0; i < junk.length; i++) junk[i] = rand() < 0.03 ? 0x0a : Math.floor(rand() * 256);
      await new Promise<void>((resolve) => {
        const s = net.createConnection(socketPath);
        s.on('error', () => resolve());
        s.write(junk, () => {
          s.destroy();
          resolve();
        });
      });
    }
    const client = await ControlClient.connect(socketPath, { expectVmId: 'vm-x' });
    const payload = Buffer.alloc(8 << 20, 7);
    const r = await client.request('echo', { a: 1 }, payload);
    expect(r.ret).toEqual({ args: { a: 1 } });
    expect(r.attachment?.equals(payload)).toBe(true);
    await expect(client.request('need-int')).rejects.toThrow(/InvalidArgument: argument "n"/);
    client.close();
  });
});
