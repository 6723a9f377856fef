// Ferry's QMP client against a real QEMU with no guest (-machine none): replies, QEMU's error
// classes, events, pipelining, timeouts, QEMU dying under a command, and no leaked sockets.
import * as path from 'node:path';
import { QmpClient } from '../../hypervisor/qemu/qmp/client';
import { queryStatus } from '../../hypervisor/qemu/qmp/commands';
import { QmpCommandError, QmpConnectError, QmpDisconnectedError, QmpError, QmpTimeoutError } from '../../hypervisor/qemu/qmp/errors';
import { describeWithTools, Peers } from '../support/peers';
import { rejection, openFds } from '../support/assertions';

jest.setTimeout(60_000);


describeWithTools('QMP client against QEMU', ['qemu-system-x86_64'], () => {
  const peers = new Peers();
  let dir: string;
  let qmp: QmpClient;
  let qmpPath: string;

  beforeAll(async () => {
    dir = await peers.tempDir('ferry-qmp-');
    const image = await peers.image(dir, 'disk.raw', 16 << 20);
    ({ qmp, qmpPath } = await peers.qemu(dir, ['-blockdev', `driver=file,filename=${image},node-name=disk0-file`, '-blockdev', 'driver=raw,file=disk0-file,node-name=disk0']));
  });
  afterAll(() => peers.cleanup());

  it('negotiates and answers query-status', async () => {
    expect(qmp.version).toMatch(/^\d+\.\d+\.\d+$/);
    expect(qmp.greeting.QMP.capabilities).toEqual(expect.any(Array));
    expect(await queryStatus(qmp)).toMatchObject({ running: true, status: 'running' });
    expect(await qmp.execute('query-name')).toEqual({});
  });

  it("rejects an unknown command with QEMU's CommandNotFound class and stays usable", async () => {
    const err = await rejection(qmp.execute('ferry-no-such-command'));
    expect(err).toBeInstanceOf(QmpCommandError);
    expect(err).toBeInstanceOf(QmpError);
    expect(err).toMatchObject({ command: 'ferry-no-such-command', errorClass: 'CommandNotFound' });
    expect((err as QmpCommandError).desc).toContain('ferry-no-such-command');
    expect((await queryStatus(qmp)).running).toBe(true);
  });

  it('rejects bad arguments with GenericError and the description', async () => {
    const extra = (await rejection(qmp.execute('query-status', { bogus: 1 }))) as QmpCommandError;
    expect(extra).toMatchObject({ errorClass: 'GenericError' });
    expect(extra.desc).toContain('bogus');
    const badValue = (await rejection(qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'b', granularity: 3 }))) as QmpCommandError;
    expect(badValue).toBeInstanceOf(QmpCommandError);
    expect(badValue.message).toContain('block-dirty-bitmap-add failed: GenericError');
    expect(badValue.desc).toMatch(/granularity/i);
    const noNode = (await rejection(qmp.execute('block-dirty-bitmap-add', { node: 'nope', name: 'b' }))) as QmpCommandError;
    expect(noNode.desc).toContain('nope');
  });

  it('delivers events to subscribers and to a waiter that marked the stream before the command', async () => {
    const nbdSock = path.join(dir, 'nbd.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } });
    const seen: unknown[] = [];
    const off = qmp.on('BLOCK_EXPORT_DELETED', (data) => seen.push(data.id));
    const all: string[] = [];
    const offAll = qmp.on('*', (_data, ev) => all.push(ev.event));
    for (const id of ['e1', 'e2']) {
      await qmp.execute('block-export-add', { type: 'nbd', id, 'node-name': 'disk0', writable: false });
      const mark = qmp.eventMark();
      await qmp.execute('block-export-del', { id });
      // QEMU may send the event before the reply: the mark makes the wait see it either way.
      const ev = await qmp.waitEvent('BLOCK_EXPORT_DELETED', (d) => d.id === id, 10_000, mark);
      expect(ev.data).toEqual({ id });
      expect(ev.timestamp.seconds).toBeGreaterThan(0);
    }
    off();
    offAll();
    expect(seen).toEqual(['e1', 'e2']);
    expect(all).toEqual(['BLOCK_EXPORT_DELETED', 'BLOCK_EXPORT_DELETED']);
    await qmp.execute('nbd-server-stop');
  });

  it('times out waiting for an event that does not come', async () => {
    const err = await rejection(qmp.waitEvent('FERRY_NEVER', undefined, 200));
    expect(err).toBeInstanceOf(QmpTimeoutError);
    expect(err.message).toContain('FERRY_NEVER');
  });

  it('pipelines commands and matches every reply to its command', async () => {
    const calls = Array.from({ length: 60 }, (_, i) =>
      i % 3 === 0 ? qmp.execute('query-status').then((r) => ['status', r]) : i % 3 === 1 ? qmp.execute('query-name').then((r) => ['name', r]) : qmp.execute(`ferry-missing-${i}`).catch((e: QmpCommandError) => ['error', e.command]),
    );
    const results = await Promise.all(calls);
    results.forEach((r, i) => {
      if (i % 3 === 0) expect(r).toEqual(['status', expect.objectContaining({ running: true })]);
      else if (i % 3 === 1) expect(r).toEqual(['name', {}]);
      else expect(r).toEqual(['error', `ferry-missing-${i}`]);
    });
  });

  it('refuses a second client while one holds the monitor, naming why', async () => {
    const err = await rejection(QmpClient.connect(qmpPath, { timeoutMs: 500 }));
    expect(err).toBeInstanceOf(QmpConnectError);
    expect(err.message).toMatch(/no QMP greeting.*another client/);
  });

  it('fails a command that gets no reply in time, naming it, and drops its late reply', async () => {
    const { proc, qmp: q } = await peers.qemu(dir, [], 'stopped');
    proc.kill('SIGSTOP');
    try {
      const err = await rejection(q.execute('query-status', undefined, { timeoutMs: 300 }));
      expect(err).toBeInstanceOf(QmpTimeoutError);
      expect(err.message).toContain('query-status');
    } finally {
      proc.kill('SIGCONT');
    }
    expect(await q.execute('query-name')).toEqual({});
    expect(q.closed).toBe(false);
    await q.execute('quit');
  });

  it('rejects the command in flight and reports the close when QEMU is killed under it', async () => {
    const { proc, qmp: q } = await peers.qemu(dir, [], 'killed');
    const reasons: QmpError[] = [];
    q.onClose((r) => reasons.push(r));
    proc.kill('SIGSTOP'); // the command is surely in flight when QEMU dies
    const pending = q.execute('query-status');
    proc.kill('SIGKILL');
    const err = await rejection(pending);
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect(err.message).toMatch(/query-status got no reply: .*killed or crashed/);
    expect(q.closed).toBe(true);
    expect(reasons).toHaveLength(1);
    expect(reasons[0]).toBeInstanceOf(QmpDisconnectedError);
    expect((reasons[0] as QmpDisconnectedError).byClient).toBe(false);
    const after = await rejection(q.execute('query-status'));
    expect(after).toBeInstanceOf(QmpDisconnectedError);
  });

  it('reports a clean shutdown as the close reason', async () => {
    const { proc, qmp: q } = await peers.qemu(dir, [], 'quit');
    const reason = new Promise<QmpError>((res) => q.onClose(res));
    const exited = new Promise((res) => proc.once('exit', res));
    await q.execute('quit');
    expect((await reason).message).toMatch(/QEMU shut down \(host-qmp-quit\)/);
    await exited;
  });

  it('leaks no socket over 20 connect/close cycles and 20 failed connects', async () => {
    const { proc, qmp: q, qmpPath: p } = await peers.qemu(dir, [], 'cycles');
    await q.close();
    const before = await openFds();
    for (let i = 0; i < 20; i++) {
      const c = await QmpClient.connect(p);
      expect((await queryStatus(c)).running).toBe(true);
      const closed = new Promise<QmpError>((res) => c.onClose(res));
      await c.close();
      expect(await closed).toMatchObject({ byClient: true });
    }
    for (let i = 0; i < 20; i++) {
      const err = await rejection(QmpClient.connect(path.join(dir, 'no-such.sock'), { timeoutMs: 60 }));
      expect(err).toBeInstanceOf(QmpConnectError);
      expect(err.message).toMatch(/ENOENT.*-qmp unix:/);
    }
    expect(await openFds()).toBe(before);
    proc.kill('SIGKILL');
  });
});
