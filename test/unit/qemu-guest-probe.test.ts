// GuestProbe against a stand-in for QEMU's chardev socket (a unix socket server in this process
// that speaks the guest's side of guest/PROTOCOL.md): gaps on the host clock, replies, drops.
import { promises as fs } from 'node:fs';
import * as net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseGuestLine } from '../../hypervisor/qemu/guest-lines';
import { GuestCommandError, GuestProbe, hostNow, longestGap } from '../../hypervisor/qemu/guest-probe';

class FakeGuest {
  readonly server: net.Server;
  client: net.Socket | null = null;
  seq = 0;
  received: string[] = [];
  answer: (id: string, command: string) => string | null = (id) => `R ${id} ok`;
  private timer: NodeJS.Timeout | null = null;

  constructor(readonly socketPath: string) {
    this.server = net.createServer((socket) => {
      this.client = socket;
      let buffered = '';
      socket.setEncoding('latin1');
      socket.on('error', () => undefined);
      socket.on('data', (chunk: string) => {
        buffered += chunk;
        let nl: number;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          this.received.push(line);
          const [id, ...rest] = line.split(' ');
          const reply = this.answer(id, rest.join(' '));
          if (reply) socket.write(`${reply}\n`);
        }
      });
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.socketPath, resolve));
  }

  beat(): void {
    this.seq++;
    this.client?.write(`H ${this.seq} ${this.seq * 2} 0 ${this.seq * 2} 0 0 0 120 0 0 0\n`);
  }

  startBeating(everyMs = 5): void {
    this.stopBeating();
    this.timer = setInterval(() => this.beat(), everyMs);
  }

  stopBeating(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  async close(): Promise<void> {
    this.stopBeating();
    this.client?.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

let dir: string;
let guest: FakeGuest;
let probe: GuestProbe | null = null;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-probe-'));
  guest = new FakeGuest(path.join(dir, 'probe.sock'));
  await guest.listen();
});

afterEach(async () => {
  probe?.close();
  probe = null;
  await guest.close();
  await fs.rm(dir, { recursive: true, force: true });
});

it('stamps heartbeats on arrival and measures the longest gap on the host clock', async () => {
  probe = await GuestProbe.connect(guest.socketPath);
  guest.startBeating();
  await probe.waitForHeartbeat((hb) => hb.seq >= 10);
  expect(probe.latest()).toMatchObject({ ops: probe.latest()!.seq * 2, writes: probe.latest()!.seq * 2, ioMaxUs: 120 });
  const mark = probe.mark();
  await probe.waitForHeartbeat((hb) => hb.seq >= 20);
  guest.stopBeating();
  await probe.waitForHeartbeat((hb) => hb.seq === guest.seq); // the last one sent has arrived
  const silentFrom = hostNow();
  await sleep(300);
  const silentTo = hostNow();
  guest.startBeating();
  const lastSeq = guest.seq;
  await probe.waitForHeartbeat((hb) => hb.seq >= lastSeq + 10);
  const gap = probe.gapSince(mark);
  expect(gap.longestMs).toBeGreaterThanOrEqual(silentTo - silentFrom);
  expect(gap.from).toBeLessThanOrEqual(silentFrom);
  expect(gap.to).toBeGreaterThanOrEqual(silentTo);
  expect(gap.missed).toBe(0);
  // Still silent now: the open gap counts.
  guest.stopBeating();
  await sleep(100);
  expect(probe.gapSince(probe.latest()!.at).longestMs).toBeGreaterThanOrEqual(100);
});

it('counts heartbeats that never arrived (a jump in the sequence)', async () => {
  probe = await GuestProbe.connect(guest.socketPath);
  const mark = probe.mark();
  guest.beat();
  guest.seq += 5; // five beats lost, as while no client was connected
  guest.beat();
  await probe.waitForHeartbeat((hb) => hb.seq === 7);
  expect(longestGap([probe], mark).missed).toBe(5);
});

it('skips lines it cannot parse (the tail of a line begun before it connected)', async () => {
  probe = await GuestProbe.connect(guest.socketPath);
  guest.client!.write('0 3 0 0 0 0 0 0\nH 1 2 3\n');
  guest.beat();
  await probe.waitForHeartbeat(() => true);
  expect(probe.latest()!.seq).toBe(1);
  expect(parseGuestLine('H 1 2 3')).toEqual({ kind: 'other', text: 'H 1 2 3' });
});

it('resolves replies by id, and refuses with the guest\'s code', async () => {
  guest.answer = (id, command) => (command === 'stats' ? `R ${id} ok ops=5 workload=idle` : `R ${id} err unknown-command ${command}: use ping`);
  probe = await GuestProbe.connect(guest.socketPath);
  expect(await probe.stats()).toEqual({ ops: '5', workload: 'idle' });
  const err = await probe.command('dance').catch((e: unknown) => e);
  expect(err).toBeInstanceOf(GuestCommandError);
  expect(err).toMatchObject({ code: 'unknown-command', message: expect.stringContaining('dance: use ping') });
});

it('collects the violations a verify reports', async () => {
  guest.answer = (id, command) => {
    if (command !== 'verify') return null;
    guest.client!.write('V src=read block=3 expected=2 found=1\nV src=verify block=9 expected=4 found=torn:4\n');
    return `R ${id} ok checked=16 violations=1 unreadable=0 ms=12`;
  };
  probe = await GuestProbe.connect(guest.socketPath);
  const seen: unknown[] = [];
  probe.on('violation', (v) => seen.push(v));
  expect(await probe.verify()).toEqual({ checked: 16, violations: 1, unreadable: 0, guestMs: 12, reported: [{ source: 'verify', block: 9, expected: 4, found: 'torn:4' }] });
  expect(seen).toHaveLength(2);
});

it('says clearly when the guest does not answer', async () => {
  guest.answer = () => null;
  probe = await GuestProbe.connect(guest.socketPath);
  await expect(probe.command('ping', { timeoutMs: 200 })).rejects.toThrow(/did not answer "ping" .* within 200 ms .*no heartbeat has arrived/);
  await expect(probe.waitReady({ timeoutMs: 200 })).rejects.toThrow(/no ready line or heartbeat/);
});

it('takes the ready line, or asks `info` when it connected after it', async () => {
  guest.answer = (id, command) => (command === 'info' ? `R ${id} ok protocol=1 seed=9` : null);
  probe = await GuestProbe.connect(guest.socketPath);
  guest.beat();
  expect(await probe.waitReady()).toEqual({ protocol: '1', seed: '9' });
  probe.close();
  probe = await GuestProbe.connect(guest.socketPath);
  guest.client!.write('FERRY-READY protocol=1 seed=4 workload=idle\n');
  expect(await probe.waitReady()).toMatchObject({ seed: '4', workload: 'idle' });
});

it('fails a pending command when the connection drops, then reconnects', async () => {
  guest.answer = (id, command) => (command === 'verify' ? null : `R ${id} ok`);
  probe = await GuestProbe.connect(guest.socketPath);
  const events: string[] = [];
  probe.on('disconnected', () => events.push('disconnected'));
  probe.on('connected', () => events.push('connected'));
  const pending = probe.command('verify');
  await sleep(50);
  guest.client!.destroy();
  await expect(pending).rejects.toThrow(/dropped: the command may or may not have run/);
  expect(await probe.command('ping', { timeoutMs: 5000 })).toEqual({});
  expect(events).toEqual(['disconnected', 'connected']);
});

it('gives up reconnecting after its timeout and says so', async () => {
  probe = await GuestProbe.connect(guest.socketPath, { reconnectTimeoutMs: 300 });
  const lost = new Promise<Error>((resolve) => probe!.once('lost', resolve));
  await guest.close();
  await fs.rm(guest.socketPath, { force: true });
  expect((await lost).message).toMatch(/has not accepted a connection for 300 ms/);
  await expect(probe.command('ping')).rejects.toThrow(/has not accepted a connection/);
  guest = new FakeGuest(path.join(dir, 'other.sock')); // for afterEach
  await guest.listen();
});

it('cannot connect to a socket nobody listens on', async () => {
  await expect(GuestProbe.connect(path.join(dir, 'none.sock'), { connectTimeoutMs: 300 })).rejects.toThrow(/cannot connect to the guest channel .* within 300 ms/);
});

it('gives the first heartbeat at or after a point, and the longest gap it saw', async () => {
  probe = await GuestProbe.connect(guest.socketPath);
  guest.beat();
  await probe.waitForHeartbeat((hb) => hb.seq === 1);
  const since = hostNow();
  expect(await probe.nextHeartbeat(since, 100)).toBeNull();
  const waiting = probe.nextHeartbeat(since, 5000);
  await sleep(150);
  guest.beat();
  const at = await waiting;
  expect(at).toBe(probe.latest()!.at);
  expect(at! - since).toBeGreaterThanOrEqual(150);
  expect(probe.maxGapMs).toBeGreaterThanOrEqual(150);
});
