// Ferry's NBD client against servers nobody here wrote: qemu-nbd (Unix socket and TCP) and QEMU's
// built-in NBD server. Every byte read is compared with the image file.
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../nbd/client';
import { NbdCommandError, NbdConnectError, NbdDisconnectedError, NbdError, NbdOptionError, NbdTimeoutError } from '../../nbd/errors';
import { BASE_ALLOCATION, State, TransmissionFlag } from '../../nbd/protocol';
import { freePort } from '../../scripts/temporal-cli';
import { describeWithTools, Peers } from '../support/peers';
import { rejection, openFds } from '../support/assertions';

jest.setTimeout(60_000);

const MiB = 1 << 20;

/** A 96 MiB image: data at 8-24 MiB and 40-41 MiB (+ 3 bytes at 90 MiB), holes elsewhere. */
async function sparseImage(peers: Peers, dir: string): Promise<{ file: string; content: Buffer }> {
  const file = await peers.image(dir, 'disk.raw', 96 * MiB);
  const content = Buffer.alloc(96 * MiB);
  randomBytes(16 * MiB).copy(content, 8 * MiB);
  randomBytes(MiB).copy(content, 40 * MiB);
  content.write('abc', 90 * MiB);
  const fh = await fs.open(file, 'r+');
  for (const [at, n] of [[8 * MiB, 16 * MiB], [40 * MiB, MiB], [90 * MiB, 3]]) await fh.write(content, at, n, at);
  await fh.close();
  return { file, content };
}

describeWithTools('NBD client against qemu-nbd', ['qemu-nbd'], () => {
  const peers = new Peers();
  let dir: string;
  let file: string;
  let content: Buffer;
  let sock: string;

  beforeAll(async () => {
    dir = await peers.tempDir('ferry-nbdc-');
    ({ file, content } = await sparseImage(peers, dir));
    sock = path.join(dir, 'nbd.sock');
    await peers.qemuNbd(file, sock, 'disk0', ['--persistent', '--shared=8']);
  });
  afterAll(() => peers.cleanup());

  const connect = (extra: Partial<Parameters<typeof NbdClient.connect>[1]> = {}) =>
    NbdClient.connect({ path: sock }, { exportName: 'disk0', ...extra }).then((c) => peers.track(c));

  it('negotiates fixed newstyle, structured replies, base:allocation and the export', async () => {
    const c = await connect({ metaContexts: [BASE_ALLOCATION] });
    expect(c.size).toBe(96 * MiB);
    expect(c.structuredReplies).toBe(true);
    expect(c.contexts.has(BASE_ALLOCATION)).toBe(true);
    expect(c.flags & TransmissionFlag.SEND_FLUSH).toBeTruthy();
    expect(c.flags & TransmissionFlag.SEND_FUA).toBeTruthy();
    expect(c.readOnly).toBe(false);
    expect(c.blockSizes.maximum).toBeGreaterThanOrEqual(MiB);
    await c.close();
  });

  it('reads exactly the bytes of the file, holes included, split above the maximum payload', async () => {
    const c = await connect();
    for (const [at, n] of [[0, 4096], [8 * MiB - 100, 300], [8 * MiB + 1, 1], [90 * MiB, 3], [96 * MiB - 7, 7]]) {
      expect((await c.read(at, n)).equals(content.subarray(at, at + n))).toBe(true);
    }
    expect(c.blockSizes.maximum).toBeLessThan(80 * MiB);
    const whole = await c.read(4 * MiB, 80 * MiB); // more than one request
    expect(whole.equals(content.subarray(4 * MiB, 84 * MiB))).toBe(true);
    await c.close();
  });

  it('keeps many requests in flight and matches each reply to its request', async () => {
    const c = await connect({ maxInFlight: 64 });
    const reads = Array.from({ length: 300 }, (_, i) => {
      const at = (i * 7919 * 4099) % (96 * MiB - 70_000);
      const n = 1 + ((i * 104729) % 65_536);
      return c.read(at, n).then((b) => b.equals(content.subarray(at, at + n)));
    });
    expect((await Promise.all(reads)).every(Boolean)).toBe(true);
    await c.close();
  });

  it('maps base:allocation (holes read as zeroes) and reads only the data extents', async () => {
    const c = await connect({ metaContexts: [BASE_ALLOCATION] });
    const map = await c.mapExtents(BASE_ALLOCATION);
    expect(map[0]).toEqual({ offset: 0, length: 8 * MiB, flags: State.HOLE | State.ZERO });
    expect(map.reduce((s, e) => s + e.length, 0)).toBe(96 * MiB);
    const data = map.filter((e) => !(e.flags & State.ZERO));
    for (const at of [8 * MiB, 20 * MiB, 40 * MiB, 90 * MiB]) expect(data.some((e) => e.offset <= at && at < e.offset + e.length)).toBe(true);
    for (const at of [30 * MiB, 60 * MiB]) expect(data.some((e) => e.offset <= at && at < e.offset + e.length)).toBe(false);
    const copy = Buffer.alloc(96 * MiB);
    let pieces = 0;
    for await (const { offset, data: d } of c.readRanges(data, { requestBytes: 2 * MiB, windowBytes: 16 * MiB })) {
      d.copy(copy, offset);
      pieces++;
    }
    expect(pieces).toBeGreaterThan(8);
    expect(copy.equals(content)).toBe(true);
    // Recycled buffers: each piece is copied out before the next is asked for.
    const again = Buffer.alloc(96 * MiB);
    for await (const { offset, data: d } of c.readRanges(data, { requestBytes: MiB, windowBytes: 8 * MiB, reuseBuffers: true })) d.copy(again, offset);
    expect(again.equals(content)).toBe(true);
    const into = Buffer.alloc(5000);
    expect((await c.readInto(8 * MiB + 3, into)) === into && into.equals(content.subarray(8 * MiB + 3, 8 * MiB + 5003))).toBe(true);
    const one = await c.blockStatus(BASE_ALLOCATION, 0, 96 * MiB, { reqOne: true });
    expect(one).toEqual([{ offset: 0, length: 8 * MiB, flags: State.HOLE | State.ZERO }]);
    await c.close();
  });

  it('writes (with FUA), writes zeroes, trims and flushes onto the file', async () => {
    const c = await connect();
    const data = randomBytes(3 * MiB + 5);
    await c.write(50 * MiB + 3, data, { fua: true });
    await c.writeZeroes(8 * MiB, MiB, { noHole: true });
    await c.trim(60 * MiB, MiB);
    await c.flush();
    expect((await c.read(50 * MiB + 3, data.length)).equals(data)).toBe(true);
    const onDisk = await fs.readFile(file);
    expect(onDisk.subarray(50 * MiB + 3, 50 * MiB + 3 + data.length).equals(data)).toBe(true);
    expect(onDisk.subarray(8 * MiB, 9 * MiB).every((b) => b === 0)).toBe(true);
    data.copy(content, 50 * MiB + 3);
    content.fill(0, 8 * MiB, 9 * MiB);
    await c.close();
  });

  it('refuses bad requests before sending them, with the reason', async () => {
    const c = await connect();
    await expect(c.read(96 * MiB - 10, 20)).rejects.toThrow(/past the end of export 'disk0'/);
    await expect(c.blockStatus(BASE_ALLOCATION, 0, 10)).rejects.toThrow(/not selected .*metaContexts/);
    await expect(c.read(-1, 10)).rejects.toThrow(RangeError);
    expect((await c.read(0, 10)).length).toBe(10); // still usable
    await c.close();
    await expect(c.read(0, 10)).rejects.toBeInstanceOf(NbdDisconnectedError);
  });

  it('names the refusal of an unknown export and of a context the server lacks', async () => {
    const unknown = await rejection(NbdClient.connect({ path: sock }, { exportName: 'nope' }));
    expect(unknown).toBeInstanceOf(NbdOptionError);
    expect(unknown).toMatchObject({ reply: 'NBD_REP_ERR_UNKNOWN' });
    expect(unknown.message).toContain("'nope'");
    const ctx = await rejection(NbdClient.connect({ path: sock }, { exportName: 'disk0', metaContexts: ['qemu:dirty-bitmap:none'] }));
    expect(ctx).toBeInstanceOf(NbdConnectError);
    expect(ctx.message).toContain('qemu:dirty-bitmap:none');
    const noServer = await rejection(NbdClient.connect({ path: path.join(dir, 'none.sock') }, { exportName: 'disk0' }));
    expect(noServer.message).toMatch(/cannot connect .*ENOENT/);
  });

  it('speaks TCP too', async () => {
    const port = await freePort();
    const proc = peers.spawn('qemu-nbd', ['-f', 'raw', '-x', 'disk0', '-b', '127.0.0.1', '-p', String(port), '-t', '--shared=2', '-r', file]);
    let c: NbdClient | null = null;
    for (const started = Date.now(); !c; ) {
      c = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' }).catch((err: Error) => {
        if (Date.now() - started > 20_000 || proc.exitCode !== null) throw err;
        return null;
      });
    }
    peers.track(c);
    expect(c.readOnly).toBe(true);
    expect((await c.read(40 * MiB, MiB)).equals(content.subarray(40 * MiB, 41 * MiB))).toBe(true);
    await expect(c.write(0, Buffer.alloc(512))).rejects.toThrow(/read-only/);
    await c.close();
    proc.kill('SIGTERM');
  });

  it('fails a request the server does not answer in time and drops its late reply', async () => {
    const s2 = path.join(dir, 'stalled.sock');
    const proc = await peers.qemuNbd(file, s2, 'disk0', ['--persistent']);
    const c = peers.track(await NbdClient.connect({ path: s2 }, { exportName: 'disk0', requestTimeoutMs: 300 }));
    proc.kill('SIGSTOP');
    try {
      const err = await rejection(c.read(8 * MiB, 4096));
      expect(err).toBeInstanceOf(NbdTimeoutError);
      expect(err.message).toMatch(/NBD_CMD_READ of 4096 bytes at 8388608 got no reply/);
    } finally {
      proc.kill('SIGCONT');
    }
    expect((await c.read(8 * MiB, 4096)).equals(content.subarray(8 * MiB, 8 * MiB + 4096))).toBe(true);
    // Killed with a request in flight: it fails as a disconnect, and onClose says why.
    const reasons: (Error | null)[] = [];
    c.onClose((r) => reasons.push(r));
    proc.kill('SIGSTOP');
    const pending = c.read(0, 4096);
    proc.kill('SIGKILL');
    expect(await rejection(pending)).toBeInstanceOf(NbdDisconnectedError);
    expect(c.closed).toBe(true);
    expect(reasons).toEqual([expect.any(NbdDisconnectedError)]);
  });

  it("reports the server's error by its NBD name and stays usable", async () => {
    const s3 = path.join(dir, 'faulty.sock');
    const opts = `driver=raw,file.driver=blkdebug,file.image.filename=${file},file.inject-error.0.event=write_aio,file.inject-error.0.errno=28,file.inject-error.0.once=on`;
    peers.spawn('qemu-nbd', ['--image-opts', '-x', 'disk0', '-k', s3, '-t', opts]);
    for (const started = Date.now(); !(await fs.stat(s3).catch(() => null)); ) {
      if (Date.now() - started > 20_000) throw new Error('qemu-nbd with blkdebug did not start');
      await new Promise((r) => setTimeout(r, 20));
    }
    const c = peers.track(await NbdClient.connect({ path: s3 }, { exportName: 'disk0' }));
    const err = await rejection(c.write(0, Buffer.alloc(4096, 1)));
    expect(err).toBeInstanceOf(NbdCommandError);
    expect(err).toBeInstanceOf(NbdError);
    expect(err).toMatchObject({ errno: 28, errnoName: 'NBD_ENOSPC', command: 'NBD_CMD_WRITE' });
    expect(err.message).toMatch(/NBD_CMD_WRITE of 4096 bytes at 0 .* failed: NBD_ENOSPC/);
    await c.write(0, content.subarray(0, 4096));
    expect((await c.read(0, 4096)).equals(content.subarray(0, 4096))).toBe(true);
    await c.close();
  });

  it('leaks no socket over 20 connect/close cycles and 20 failed connects', async () => {
    await (await connect()).close();
    const before = await openFds();
    for (let i = 0; i < 20; i++) {
      const c = await NbdClient.connect({ path: sock }, { exportName: 'disk0' });
      await c.read(0, 512);
      await c.close();
    }
    for (let i = 0; i < 10; i++) await rejection(NbdClient.connect({ path: sock }, { exportName: `missing-${i}` }));
    for (let i = 0; i < 10; i++) await rejection(NbdClient.connect({ path: path.join(dir, 'none.sock') }, { exportName: 'disk0' }));
    expect(await openFds()).toBe(before);
  });
});

describeWithTools("NBD client against QEMU's NBD server", ['qemu-system-x86_64'], () => {
  const peers = new Peers();
  afterAll(() => peers.cleanup());

  it('reads an export of a block node and its base:allocation map', async () => {
    const dir = await peers.tempDir('ferry-nbdq-');
    const { file, content } = await sparseImage(peers, dir);
    const { qmp } = await peers.qemu(dir, ['-blockdev', `driver=file,filename=${file},node-name=disk0-file`, '-blockdev', 'driver=raw,file=disk0-file,node-name=disk0']);
    const sock = path.join(dir, 'qemu-nbd.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'ro', 'node-name': 'disk0', name: 'disk0', writable: false });
    const c = peers.track(await NbdClient.connect({ path: sock }, { exportName: 'disk0', metaContexts: [BASE_ALLOCATION] }));
    expect(c.readOnly).toBe(true);
    const map = await c.mapExtents(BASE_ALLOCATION);
    expect(map.reduce((s, e) => s + e.length, 0)).toBe(96 * MiB);
    expect(map.find((e) => e.offset === 0)?.flags).toBe(State.HOLE | State.ZERO);
    const copy = Buffer.alloc(96 * MiB);
    for await (const { offset, data } of c.readRanges(map.filter((e) => !(e.flags & State.ZERO)))) data.copy(copy, offset);
    expect(copy.equals(content)).toBe(true);
    expect((await c.read(0, 96 * MiB)).equals(content)).toBe(true);
    await c.close();
    await qmp.execute('block-export-del', { id: 'ro' });
  });
});
