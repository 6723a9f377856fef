// Ferry's NBD server against clients nobody here wrote: nbdinfo, nbdcopy, qemu-io, qemu-img, and
// QEMU's own NBD block driver (a guest-less QEMU whose disk node is Ferry's export, re-exported
// through QEMU's NBD server so a client can write through QEMU into Ferry). Also: a server restart
// under QEMU's reconnect-delay, and no lock that keeps QEMU from opening the image.
import { randomBytes } from 'node:crypto';
import { promises as fs, existsSync } from 'node:fs';
import * as path from 'node:path';
import type { NbdBackend } from '../../nbd/backend';
import { NbdClient } from '../../nbd/client';
import { FileBackend } from '../../nbd/file-backend';
import { NbdBackendError, NbdCommandError, NbdError } from '../../nbd/errors';
import { NbdErrno } from '../../nbd/protocol';
import { NbdServer } from '../../nbd/server';
import { freePort } from '../../scripts/temporal-cli';
import { describeWithTools, nbdUri, Peers, run } from '../support/peers';

jest.setTimeout(90_000);

const MiB = 1 << 20;
const SIZE = 64 * MiB;

/** Reads wait while the gate is held: a postcopy block that has not arrived. */
class GatedBackend implements NbdBackend {
  private gate: Promise<void> | null = null;
  private open: (() => void) | null = null;
  readonly waiting: number[] = [];
  constructor(private readonly inner: FileBackend) {}
  get size() {
    return this.inner.size;
  }
  readonly multiConn = true;
  hold(): void {
    this.gate = new Promise((res) => (this.open = res));
  }
  release(): void {
    this.open?.();
    this.gate = null;
  }
  async read(offset: number, length: number): Promise<Buffer> {
    if (this.gate) {
      this.waiting.push(offset);
      await this.gate;
    }
    return this.inner.read(offset, length);
  }
  write(offset: number, data: Buffer, opts: { fua: boolean }) {
    return this.inner.write(offset, data, opts);
  }
  flush() {
    return this.inner.flush();
  }
}

async function until(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  for (const started = Date.now(); !(await cond()); ) {
    if (Date.now() - started > timeoutMs) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describeWithTools("NBD server against libnbd's and QEMU's clients", ['nbdinfo', 'nbdcopy', 'qemu-io', 'qemu-img', 'qemu-system-x86_64'], () => {
  const peers = new Peers();
  const errors: Error[] = [];
  let dir: string;
  let file: string;
  let backend: FileBackend;
  let server: NbdServer;
  let sock: string;
  let uri: string;

  beforeAll(async () => {
    dir = await peers.tempDir('ferry-nbds-');
    file = await peers.image(dir, 'disk.raw', SIZE);
    await fs.writeFile(file, randomBytes(SIZE));
    backend = await FileBackend.open(file);
    const ro = await FileBackend.open(file, { readOnly: true });
    sock = path.join(dir, 'ferry.sock');
    server = await NbdServer.listen({ path: sock }, { exports: { disk0: backend, ro }, onError: (e) => errors.push(e) });
    uri = nbdUri(sock, 'disk0');
  });
  afterAll(async () => {
    await server?.close();
    await backend?.close();
    await peers.cleanup();
  });

  it('is described by nbdinfo: size, flags, exports and base:allocation', async () => {
    const info = JSON.parse(await run('nbdinfo', ['--json', uri]));
    expect(info).toMatchObject({ protocol: 'newstyle-fixed', structured: true });
    expect(info.exports[0]).toMatchObject({
      'export-name': 'disk0',
      'export-size': SIZE,
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_zero: true,
      can_trim: true,
      can_multi_conn: true,
      can_cache: true,
      contexts: ['base:allocation'],
    });
    const ro = JSON.parse(await run('nbdinfo', ['--json', nbdUri(sock, 'ro')]));
    expect(ro.exports[0]).toMatchObject({ is_read_only: true, can_trim: false });
    const list = await run('nbdinfo', ['--list', '--json', nbdUri(sock, '')]);
    expect(JSON.parse(list).exports.map((e: { 'export-name': string }) => e['export-name']).sort()).toEqual(['disk0', 'ro']);
    const map = JSON.parse(await run('nbdinfo', ['--map', '--json', uri]));
    expect(map).toEqual([{ offset: 0, length: SIZE, type: 0, description: 'data' }]);
    await expect(run('nbdinfo', [nbdUri(sock, 'missing')])).rejects.toThrow(/missing|unknown|not present|no export/i);
  });

  it('copies both ways with nbdcopy, byte for byte', async () => {
    const out = path.join(dir, 'out.raw');
    await run('nbdcopy', [uri, out]);
    expect((await fs.readFile(out)).equals(await fs.readFile(file))).toBe(true);
    const src = path.join(dir, 'src.raw');
    await fs.writeFile(src, randomBytes(SIZE));
    await run('nbdcopy', ['--requests=32', src, uri]);
    expect((await fs.readFile(file)).equals(await fs.readFile(src))).toBe(true);
  });

  it('serves qemu-io reads and writes, unaligned, zeroes, discard and flush, as the file has them', async () => {
    const out = await run('qemu-io', [
      '-f', 'raw',
      '-c', 'write -P 0xab 1000 5000',
      '-c', 'read -P 0xab 1000 5000',
      '-c', 'write -z 1048576 65536',
      '-c', 'write -z -u 1114112 65536',
      '-c', 'read -P 0 1048576 65536',
      '-c', 'write -P 0x11 -f 2097152 4096',
      '-c', 'discard 8388608 4096',
      '-c', 'flush',
      '-c', 'aio_write -P 0x22 4194304 65536',
      '-c', 'aio_write -P 0x23 4259840 65536',
      '-c', 'aio_flush',
      uri,
    ]);
    expect(out).not.toMatch(/fail|error|mismatch/i);
    const f = await fs.readFile(file);
    expect(f.subarray(1000, 6000).every((b) => b === 0xab)).toBe(true);
    expect(f.subarray(MiB, MiB + 131072).every((b) => b === 0)).toBe(true);
    expect(f.subarray(2 * MiB, 2 * MiB + 4096).every((b) => b === 0x11)).toBe(true);
    expect(f.subarray(4 * MiB, 4 * MiB + 65536).every((b) => b === 0x22)).toBe(true);
    expect(f.subarray(4 * MiB + 65536, 4 * MiB + 131072).every((b) => b === 0x23)).toBe(true);
    const check = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x22 4194304 65536', uri]);
    expect(check).not.toMatch(/mismatch|fail/i);
  });

  it('is read by qemu-img convert into an equal image', async () => {
    const out = path.join(dir, 'converted.raw');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
    expect((await fs.readFile(out)).equals(await fs.readFile(file))).toBe(true);
  });

  it('serves several clients at once', async () => {
    const clients = await Promise.all([0, 1, 2].map(() => NbdClient.connect({ path: sock }, { exportName: 'disk0' }).then((c) => peers.track(c))));
    expect(server.clientCount).toBeGreaterThanOrEqual(3);
    const blocks = clients.map((_, i) => randomBytes(MiB + i));
    await Promise.all(clients.map((c, i) => c.write(20 * MiB + i * 2 * MiB, blocks[i])));
    await Promise.all(clients.map((c) => c.flush()));
    const reads = await Promise.all(clients.map((c, i) => clients[(i + 1) % 3].read(20 * MiB + i * 2 * MiB, blocks[i].length)));
    reads.forEach((r, i) => expect(r.equals(blocks[i])).toBe(true));
    const info = JSON.parse(await run('nbdinfo', ['--json', uri]));
    expect(info.exports[0]['export-size']).toBe(SIZE);
    await Promise.all(clients.map((c) => c.close()));
  });

  it('takes no lock that would keep QEMU from opening the image', async () => {
    const c = peers.track(await NbdClient.connect({ path: sock }, { exportName: 'disk0' }));
    const out = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 30M 4096', file]);
    expect(out).toMatch(/wrote 4096\/4096/);
    expect((await c.read(30 * MiB, 4096)).every((b) => b === 0x5a)).toBe(true);
    await c.close();
  });

  it("is QEMU's disk node: writes through QEMU's own NBD export land in Ferry's image", async () => {
    const { qmp } = await peers.qemu(dir, ['-blockdev', `driver=nbd,server.type=unix,server.path=${sock},export=disk0,node-name=disk0-nbd`, '-blockdev', 'driver=raw,file=disk0-nbd,node-name=disk0'], 'via');
    const qsock = path.join(dir, 'qemu-export.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: qsock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'w', 'node-name': 'disk0', name: 'disk0', writable: true });
    const c = peers.track(await NbdClient.connect({ path: qsock }, { exportName: 'disk0' }));
    expect(c.size).toBe(SIZE);
    const writes = Array.from({ length: 16 }, (_, i) => ({ at: i * 3 * MiB + (i % 4) * 512, data: randomBytes(64 * 1024 + i * 4096) }));
    await Promise.all(writes.map((w, i) => c.write(w.at, w.data, { fua: i % 2 === 0 })));
    await c.writeZeroes(50 * MiB, 2 * MiB);
    await c.flush();
    const f = await fs.readFile(file);
    for (const w of writes) expect(f.subarray(w.at, w.at + w.data.length).equals(w.data)).toBe(true);
    expect(f.subarray(50 * MiB, 52 * MiB).every((b) => b === 0)).toBe(true);
    expect((await c.read(0, SIZE)).equals(f)).toBe(true);
    await c.close();
    await qmp.execute('quit');
  });

  it('maps backend failures to NBD errors, by code, and keeps serving', async () => {
    const failing: NbdBackend = {
      size: MiB,
      read: async () => {
        throw new NbdBackendError('the source is unreachable', NbdErrno.EIO);
      },
      write: async () => {
        throw Object.assign(new Error('disk full'), { code: 'ENOSPC' });
      },
      flush: async () => undefined,
    };
    const s2 = path.join(dir, 'failing.sock');
    const srv = await NbdServer.listen({ path: s2 }, { exports: { bad: failing }, onError: () => undefined });
    try {
      // qemu-io exits 1 when a command failed; its output says which and why.
      const out = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4096', '-c', 'write 0 4096', '-c', 'flush', nbdUri(s2, 'bad')]).catch((e: Error) => e.message);
      expect(out).toMatch(/read failed: Input\/output error/);
      expect(out).toMatch(/write failed: No space left on device/);
      const c = peers.track(await NbdClient.connect({ path: s2 }, { exportName: 'bad' }));
      const err = (await c.read(0, 512).catch((e) => e)) as NbdCommandError;
      expect(err).toMatchObject({ errnoName: 'NBD_EIO' });
      expect(err.serverMessage).toContain('the source is unreachable');
      await c.flush();
      await c.close();
    } finally {
      await srv.close();
    }
  });

  it('listens on TCP too', async () => {
    const port = await freePort();
    const srv = await NbdServer.listen({ host: '127.0.0.1', port }, { exports: { disk0: backend }, onError: (e) => errors.push(e) });
    try {
      const info = JSON.parse(await run('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/disk0`]));
      expect(info.exports[0]['export-size']).toBe(SIZE);
      const c = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' });
      const data = randomBytes(3 * MiB);
      await c.write(60 * MiB, data, { fua: true });
      expect((await c.read(60 * MiB, data.length)).equals(data)).toBe(true);
      expect((await fs.readFile(file)).subarray(60 * MiB, 63 * MiB).equals(data)).toBe(true);
      await c.close();
    } finally {
      await srv.close();
    }
  });

  it('replaces a stale socket file, refuses a live one, and removes its own on close', async () => {
    const s3 = path.join(dir, 'stale.sock');
    const first = await NbdServer.listen({ path: s3 }, { exports: { disk0: backend }, onError: () => undefined });
    await expect(NbdServer.listen({ path: s3 }, { exports: { disk0: backend }, onError: () => undefined })).rejects.toThrow(/another server accepts/);
    await first.close();
    expect(existsSync(s3)).toBe(false);
    await fs.writeFile(s3, 'not a socket');
    await expect(NbdServer.listen({ path: s3 }, { exports: { disk0: backend }, onError: () => undefined })).rejects.toThrow(/not a socket/);
    await fs.rm(s3);
  });

  it('had no protocol errors from these well-behaved clients', () => {
    expect(errors.map((e) => e.message)).toEqual([]);
  });
});

describeWithTools("NBD server restarted under QEMU's reconnect-delay", ['qemu-system-x86_64'], () => {
  const peers = new Peers();
  afterAll(() => peers.cleanup());

  it('resumes the requests QEMU held when a new server comes up on the same socket', async () => {
    const dir = await peers.tempDir('ferry-nbdr-');
    const file = await peers.image(dir, 'disk.raw', SIZE);
    const content = randomBytes(SIZE);
    await fs.writeFile(file, content);
    const sock = path.join(dir, 'ferry.sock');
    const gated = new GatedBackend(await FileBackend.open(file));
    const errors: Error[] = [];
    const first = await NbdServer.listen({ path: sock }, { exports: { disk0: gated }, onError: (e) => errors.push(e), closeGraceMs: 100 });
    const { qmp } = await peers.qemu(dir, ['-blockdev', `driver=nbd,server.type=unix,server.path=${sock},export=disk0,node-name=disk0-nbd,reconnect-delay=30`, '-blockdev', 'driver=raw,file=disk0-nbd,node-name=disk0']);
    const qsock = path.join(dir, 'qemu-export.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: qsock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'w', 'node-name': 'disk0', name: 'disk0', writable: true });
    const c = peers.track(await NbdClient.connect({ path: qsock }, { exportName: 'disk0', requestTimeoutMs: 60_000 }));

    gated.hold();
    const held = c.read(10 * MiB, 256 * 1024);
    await until('the read reaches Ferry', () => gated.waiting.length > 0);
    await first.close(); // the held read gets no reply: QEMU keeps it for the next server
    expect(existsSync(sock)).toBe(false);
    const data = randomBytes(128 * 1024);
    const writeWhileDown = c.write(40 * MiB, data);

    const second = await NbdServer.listen({ path: sock }, { exports: { disk0: await FileBackend.open(file) }, onError: (e) => errors.push(e) });
    try {
      expect((await held).equals(content.subarray(10 * MiB, 10 * MiB + 256 * 1024))).toBe(true);
      await writeWhileDown;
      await c.flush();
      expect((await fs.readFile(file)).subarray(40 * MiB, 40 * MiB + data.length).equals(data)).toBe(true);
      await c.close();
      await qmp.execute('quit');
    } finally {
      gated.release();
      await second.close();
    }
    expect(gated.waiting).toHaveLength(1);
    expect(errors.map((e) => e.message)).toEqual([]);
  });

  it('without reconnect-delay, the same restart fails the held request with an I/O error (the control)', async () => {
    const dir = await peers.tempDir('ferry-nbdr-');
    const file = await peers.image(dir, 'disk.raw', SIZE);
    const sock = path.join(dir, 'ferry.sock');
    const gated = new GatedBackend(await FileBackend.open(file));
    const first = await NbdServer.listen({ path: sock }, { exports: { disk0: gated }, onError: () => undefined, closeGraceMs: 100 });
    const { qmp } = await peers.qemu(dir, ['-blockdev', `driver=nbd,server.type=unix,server.path=${sock},export=disk0,node-name=disk0-nbd`, '-blockdev', 'driver=raw,file=disk0-nbd,node-name=disk0']);
    const qsock = path.join(dir, 'qemu-export.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: qsock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'w', 'node-name': 'disk0', name: 'disk0', writable: true });
    const c = peers.track(await NbdClient.connect({ path: qsock }, { exportName: 'disk0' }));
    gated.hold();
    const held = c.read(10 * MiB, 4096).catch((e: Error) => e);
    await until('the read reaches Ferry', () => gated.waiting.length > 0);
    await first.close();
    const second = await NbdServer.listen({ path: sock }, { exports: { disk0: await FileBackend.open(file) }, onError: () => undefined });
    try {
      // QEMU's block layer fails the read with EIO, and QEMU's NBD server drops its client on a read error.
      const err = await held;
      expect(err).toBeInstanceOf(NbdError);
      expect((err as Error).message).toMatch(/NBD_EIO|closed/);
    } finally {
      gated.release();
      await second.close();
    }
  });
});
