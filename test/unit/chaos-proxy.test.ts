// The chaos proxy: it forwards bytes unchanged, flips one body byte of the next message frame when
// armed (a receiver's frame CRC must catch it), and cuts connections.
import net from 'node:net';
import { DataPlaneProxy } from '../../chaos/proxy';
import { FrameDecoder, FrameKind, encodeFrame, encodeMeta } from '../../dataplane/frame';

let sink: net.Server;
let received: Buffer[] = [];
let proxy: DataPlaneProxy;

beforeEach(async () => {
  received = [];
  sink = net.createServer((s) => s.on('data', (c: Buffer) => received.push(c)));
  await new Promise<void>((r) => sink.listen(0, '127.0.0.1', () => r()));
  const port = (sink.address() as net.AddressInfo).port;
  proxy = await DataPlaneProxy.start(() => port);
});

afterEach(async () => {
  await proxy.close();
  await new Promise((r) => sink.close(r));
});

const frames = () => [
  ...encodeFrame({ kind: FrameKind.PING, tag: 7, seq: 1 }),
  ...encodeFrame({ kind: FrameKind.MSG, tag: 7, seq: 1, type: 3, meta: encodeMeta({ b: 1 }), data: Buffer.alloc(5000, 1) }),
  ...encodeFrame({ kind: FrameKind.MSG, tag: 7, seq: 2, type: 3, data: Buffer.alloc(10, 0), zero: true }),
];

async function send(bytes: Buffer): Promise<Buffer> {
  const client = net.connect(proxy.port, '127.0.0.1');
  await new Promise((r) => client.once('connect', r));
  // in small pieces, so frames straddle chunks
  for (let i = 0; i < bytes.length; i += 777) {
    client.write(bytes.subarray(i, i + 777));
    await new Promise((r) => setTimeout(r, 2));
  }
  const until = Date.now() + 5000;
  while (Buffer.concat(received).length < bytes.length && Date.now() < until) await new Promise((r) => setTimeout(r, 10));
  client.destroy();
  return Buffer.concat(received);
}

it('forwards frames unchanged when not armed', async () => {
  const bytes = Buffer.concat(frames());
  const out = await send(bytes);
  expect(out.equals(bytes)).toBe(true);
  expect(new FrameDecoder().push(out).map((f) => f.kind)).toEqual([FrameKind.PING, FrameKind.MSG, FrameKind.MSG]);
});

it('flips one byte in the body of the next message frame, which the frame CRC catches', async () => {
  proxy.corruptNextFrame();
  const bytes = Buffer.concat(frames());
  const out = await send(bytes);
  expect(proxy.corrupted).toBe(1);
  const diff = [...out].flatMap((v, i) => (v !== bytes[i] ? [i] : []));
  expect(diff).toHaveLength(1);
  expect(diff[0]).toBeGreaterThanOrEqual(80); // past the PING frame and the MSG's header
  expect(() => new FrameDecoder().push(out)).toThrow(/checksum/i);
});

it('cuts open connections and refuses new ones while the link is down', async () => {
  const client = net.connect(proxy.port, '127.0.0.1');
  await new Promise((r) => client.once('connect', r));
  await new Promise((r) => setTimeout(r, 50));
  const closed = new Promise((r) => client.once('close', r));
  expect(proxy.cut(60_000)).toBeGreaterThan(0);
  await closed;
  const again = net.connect(proxy.port, '127.0.0.1');
  again.on('error', () => undefined);
  await new Promise((r) => again.once('close', r));
  expect(received).toEqual([]);
});
