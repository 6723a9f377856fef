// QMP framing and messages, and the client against a scripted QMP peer: what QEMU itself never
// sends (garbage, replies nobody asked for) and orderings it may send (an event before the reply).
import { promises as fs } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { QmpClient } from '../../hypervisor/qemu/qmp/client';
import { QmpConnectError, QmpDisconnectedError, QmpProtocolError, QmpTimeoutError } from '../../hypervisor/qemu/qmp/errors';
import { classify, parseGreeting } from '../../hypervisor/qemu/qmp/messages';
import { decodeLine, encodeCommand, LineSplitter, MAX_LINE_BYTES } from '../../hypervisor/qemu/qmp/protocol';
import { rejection } from '../support/assertions';

const GREETING = JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'test' }, capabilities: ['oob'] } });
const EVENT = (name: string, data: object) => JSON.stringify({ event: name, data, timestamp: { seconds: 1, microseconds: 2 } });

describe('QMP framing and messages', () => {
  it('splits lines across chunks and drops the CR of CRLF', () => {
    const s = new LineSplitter();
    expect(s.push(Buffer.from('{"a":1}\r\n{"b"'))).toEqual(['{"a":1}']);
    expect(s.push(Buffer.from(':2}'))).toEqual([]);
    expect(s.push(Buffer.from('\r\n\r\n{"c":3}\n'))).toEqual(['{"b":2}', '', '{"c":3}']);
  });

  it('refuses a line longer than the limit', () => {
    const s = new LineSplitter();
    expect(() => s.push(Buffer.alloc(MAX_LINE_BYTES + 1, 0x20))).toThrow(QmpProtocolError);
  });

  it('classifies replies, errors and events, and refuses the rest', () => {
    expect(decodeLine('{"return": {"x": 1}, "id": "ferry-1"}')).toEqual({ kind: 'return', id: 'ferry-1', value: { x: 1 } });
    expect(decodeLine('{"id": 3, "error": {"class": "GenericError", "desc": "no"}}')).toEqual({ kind: 'error', id: 3, errorClass: 'GenericError', desc: 'no' });
    expect(decodeLine(EVENT('STOP', {}))).toEqual({ kind: 'event', event: { event: 'STOP', data: {}, timestamp: { seconds: 1, microseconds: 2 } } });
    expect(decodeLine('{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 0}}')).toMatchObject({ event: { data: {} } });
    expect(decodeLine('  ')).toBeNull();
    expect(() => decodeLine('garbage')).toThrow(/not JSON: garbage/);
    expect(() => decodeLine('[1]')).toThrow(/non-object/);
    expect(() => classify({ error: { desc: 'x' } })).toThrow(/malformed QMP error/);
    expect(() => classify({ event: 'X', data: [] , timestamp: { seconds: 1, microseconds: 1 } })).toThrow(/malformed QMP event/);
    expect(() => classify({ event: 'X' })).toThrow(/malformed QMP event/);
    expect(() => classify({ hello: 1 })).toThrow(/neither a reply nor an event/);
    expect(() => parseGreeting({ QMP: { version: {} } })).toThrow(/not a QMP greeting/);
    expect(parseGreeting(JSON.parse(GREETING)).QMP.capabilities).toEqual(['oob']);
    expect(encodeCommand({ execute: 'query-status', id: 'ferry-1' })).toBe('{"execute":"query-status","id":"ferry-1"}\n');
  });
});

/** A scripted QMP peer: greets (or not), then answers each command line with `answer`. */
async function peer(dir: string, answer: (cmd: { execute: string; id: string }, send: (line: string) => void) => void, greeting = GREETING): Promise<{ path: string; close(): Promise<void> }> {
  const sockPath = path.join(dir, `qmp-${Math.random().toString(36).slice(2)}.sock`);
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
    const send = (line: string) => socket.write(`${line}\r\n`);
    send(greeting);
    const lines = new LineSplitter();
    socket.on('data', (c: Buffer) => {
      for (const l of lines.push(c)) if (l) answer(JSON.parse(l), send);
    });
  });
  await new Promise<void>((res) => server.listen(sockPath, res));
  return {
    path: sockPath,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((res) => server.close(res));
    },
  };
}

describe('QMP client against a scripted peer', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-qmpu-'));
  });
  afterAll(() => fs.rm(dir, { recursive: true, force: true }));

  const ok = (cmd: { id: string }, send: (l: string) => void) => send(JSON.stringify({ return: {}, id: cmd.id }));

  it('refuses a peer whose greeting is not QMP, and one that refuses negotiation', async () => {
    const bad = await peer(dir, ok, 'SSH-2.0-OpenSSH');
    await expect(QmpClient.connect(bad.path)).rejects.toThrow(expect.objectContaining({ name: 'QmpConnectError', message: expect.stringMatching(/not JSON: SSH-2.0/) }));
    await bad.close();
    const refusing = await peer(dir, (cmd, send) => send(JSON.stringify({ id: cmd.id, error: { class: 'GenericError', desc: 'go away' } })));
    const err = await rejection(QmpClient.connect(refusing.path));
    expect(err).toBeInstanceOf(QmpConnectError);
    expect(err.message).toMatch(/capabilities negotiation .* failed: qmp_capabilities failed: GenericError: go away/);
    await refusing.close();
  });

  it('sees an event sent before the reply of the command that caused it, through a mark', async () => {
    const p = await peer(dir, (cmd, send) => {
      if (cmd.execute === 'block-export-del') send(EVENT('BLOCK_EXPORT_DELETED', { id: 'e1' }));
      ok(cmd, send);
    });
    const c = await QmpClient.connect(p.path);
    const mark = c.eventMark();
    await c.execute('block-export-del', { id: 'e1' });
    await expect(c.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === 'e1', 1000, mark)).resolves.toMatchObject({ data: { id: 'e1' } });
    // Without the mark the event is in the past: the wait sees only new ones.
    await expect(c.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === 'e1', 100)).rejects.toBeInstanceOf(QmpTimeoutError);
    await c.close();
    await p.close();
  });

  it('closes on a reply nobody asked for, failing what is in flight with the reason', async () => {
    const p = await peer(dir, (cmd, send) => {
      if (cmd.execute === 'qmp_capabilities') return ok(cmd, send);
      send(JSON.stringify({ return: {}, id: 'someone-else' }));
    });
    const c = await QmpClient.connect(p.path);
    const reasons: Error[] = [];
    c.onClose((r) => reasons.push(r));
    const err = await rejection(c.execute('query-status'));
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect(err.message).toMatch(/query-status got no reply: QEMU replied to id "someone-else", which no command in flight has/);
    expect(reasons[0]).toBeInstanceOf(QmpProtocolError);
    expect(c.closed).toBe(true);
    await p.close();
  });

  it("closes when QEMU could not parse a command (an error without id)", async () => {
    const p = await peer(dir, (cmd, send) => {
      if (cmd.execute === 'qmp_capabilities') return ok(cmd, send);
      send(JSON.stringify({ error: { class: 'GenericError', desc: 'JSON parse error' } }));
    });
    const c = await QmpClient.connect(p.path);
    await expect(c.execute('query-status')).rejects.toThrow(/QEMU could not take a command: GenericError: JSON parse error/);
    await p.close();
  });

  it('drops the late reply of a command that timed out, and keeps working', async () => {
    let held: (() => void) | null = null;
    const p = await peer(dir, (cmd, send) => {
      if (cmd.execute === 'slow') held = () => ok(cmd, send);
      else {
        held?.();
        ok(cmd, send);
      }
    });
    const c = await QmpClient.connect(p.path, { commandTimeoutMs: 100 });
    await expect(c.execute('slow')).rejects.toThrow(/QEMU did not answer slow within 100 ms/);
    await expect(c.execute('fast')).resolves.toEqual({});
    expect(c.closed).toBe(false);
    await c.close();
    await p.close();
  });
});
