// One end of the network scenario's data-plane transfer, run inside a host's network namespace:
//   net-peer.ts serve PORT          a data-plane server that only counts (no disk), prints "ready"
//   net-peer.ts send ADDR MIB       sends MIB MiB in 4 MiB messages with migrations' window, prints {ms, bytes}
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { connect, listen } from '../dataplane';
import { WINDOW_BYTES } from '../migration/source';

const SECRET = Buffer.from('ferry-network-bench-secret');
const IDENTITY = { migrationId: 'net-bench', epoch: 1, vmId: 'net-bench-vm', stream: 'disk' };
const MESSAGE = 4 * 1024 * 1024;

async function serve(port: number): Promise<void> {
  await listen({ host: '127.0.0.1', port, secret: SECRET, accept: async () => ({ onMessage: async () => undefined }) });
  process.stdout.write('ready\n');
}

async function send(address: string, mib: number): Promise<void> {
  const pool = randomBytes(64 * 1024 * 1024);
  const total = mib * 1024 * 1024;
  const session = await connect({ address, secret: SECRET, identity: IDENTITY, windowBytes: WINDOW_BYTES });
  const t0 = performance.now();
  for (let sent = 0; sent < total; sent += MESSAGE) {
    const off = sent % pool.length;
    await session.send({ type: 1, meta: { offset: sent }, data: pool.subarray(off, off + MESSAGE) });
  }
  await session.flush();
  const ms = performance.now() - t0;
  const bytes = session.stats.bytesAcked;
  await session.close();
  process.stdout.write(`${JSON.stringify({ ms, bytes })}\n`);
}

const [role, a, b] = process.argv.slice(2);
(role === 'serve' ? serve(Number(a)) : send(a, Number(b))).catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
