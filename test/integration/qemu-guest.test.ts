// Ferry's real guest under QEMU, started straight from command-line.ts (no driver): it boots, runs
// every workload with its oracle clean, reports a block planted behind its back, re-learns its
// versions from the disk after a kill -9, and the probe sees a pause as a gap in the heartbeats.
import { promises as fsp } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { QemuAccel } from '../../hypervisor/qemu/command-line';
import { probeAccel } from '../../hypervisor/qemu/accel-probe';
import { blockContent, fillImage, readBlockHeader, GUEST_BLOCK_BYTES } from '../../hypervisor/qemu/guest-content';
import type { GuestCounters } from '../../hypervisor/qemu/guest-lines';
import type { GuestWorkload } from '../../hypervisor/qemu/guest-params';
import { GuestCommandError, hostNow, type Heartbeat } from '../../hypervisor/qemu/guest-probe';
import { bootGuest, describeQemu, makeTempDir, qmp, type TestGuest } from '../support/qemu';

jest.setTimeout(240_000);

const SEED = 4242;
const DISK_BYTES = 64 * 1024 * 1024;
const note = (line: string): void => void process.stderr.write(`[qemu-guest] ${line}\n`);

describeQemu('the QEMU guest and its probe', (assets) => {
  let dir: string;
  let image: string;
  let accel: QemuAccel;
  let vm: TestGuest | null = null;

  beforeAll(async () => {
    dir = await makeTempDir('ferry-qemu-guest-');
    image = `${dir}/disk.img`;
    await fillImage(image, SEED, DISK_BYTES);
    const choice = await probeAccel(assets());
    note(`accelerator ${choice.accel}: ${choice.reason}`);
    accel = choice.accel;
  });

  afterAll(async () => {
    await vm?.stop();
    if (dir) await fsp.rm(dir, { recursive: true, force: true });
  });

  /**
   * A heartbeat whose counters were read after the last command's reply: the latest one received may
   * predate the reply, and the one right after it may have been formatted before the reply (the
   * heartbeat thread reads the counters, then waits for the channel); the one after that cannot.
   */
  async function settled(): Promise<Heartbeat> {
    const last = await vm!.probe.waitForHeartbeat(() => true);
    return vm!.probe.waitForHeartbeat((hb) => hb.seq >= last.seq + 2);
  }

  /** Waits until the counters named in `grow` advanced by at least `by` from now. */
  async function advances(grow: (keyof GuestCounters)[], by = 20): Promise<{ from: Heartbeat; to: Heartbeat }> {
    const probe = vm!.probe;
    const from = await settled();
    const to = await probe.waitForHeartbeat((hb) => grow.every((k) => hb[k] >= from[k] + by), { timeoutMs: 60_000 });
    return { from, to };
  }

  it('boots to its ready line with the parameters it was given', async () => {
    const started = hostNow();
    vm = await bootGuest({ assets: assets(), accel, image, params: { seed: SEED, workload: 'randwrite', rate: 200, fill: true } });
    note(`boot to ready: ${(hostNow() - started).toFixed(0)} ms on the host clock (guest uptime ${vm.ready.boot_ms} ms)`);
    expect(vm.ready).toMatchObject({
      protocol: '1',
      guest: assets().guestVersion,
      seed: String(SEED),
      blocks: String(DISK_BYTES / GUEST_BLOCK_BYTES),
      fill: '1',
      rescan: '0',
      workload: 'randwrite',
      rate: '200',
    });
  });

  const expectations: [GuestWorkload, (keyof GuestCounters)[], (keyof GuestCounters)[]][] = [
    ['randwrite', ['ops', 'writes'], ['reads', 'pages']],
    ['seqwrite', ['ops', 'writes'], ['reads', 'pages']],
    ['mixed', ['ops', 'reads', 'writes'], ['pages']],
    ['readmostly', ['ops', 'reads'], ['pages']],
    ['memhog', ['ops', 'pages'], ['reads', 'writes']],
  ];
  it.each(expectations)('runs %s: its counters advance, the others stay, no violation', async (workload, grow, still) => {
    const reply = await vm!.probe.setWorkload(workload);
    expect(reply.workload).toBe(workload);
    const { from, to } = await advances(grow);
    for (const k of still) expect(to[k]).toBe(from[k]);
    expect(to.violations).toBe(0);
    expect(to.ioErrors).toBe(0);
  });

  it('idle does nothing but heartbeat', async () => {
    await vm!.probe.setWorkload('idle');
    const from = await settled();
    const to = await vm!.probe.waitForHeartbeat((hb) => hb.seq >= from.seq + 40);
    expect({ ops: to.ops, reads: to.reads, writes: to.writes, pages: to.pages }).toEqual({ ops: from.ops, reads: from.reads, writes: from.writes, pages: from.pages });
  });

  it('measures the guest at rate 0 (as fast as it can)', async () => {
    const rates: string[] = [];
    for (const workload of ['randwrite', 'seqwrite', 'mixed', 'readmostly', 'memhog'] as const) {
      await vm!.probe.setWorkload(workload);
      await vm!.probe.setRate(0);
      const from = await vm!.probe.waitForHeartbeat(() => true);
      await sleep(1500);
      const to = vm!.probe.latest()!;
      rates.push(`${workload} ${(((to.ops - from.ops) * 1000) / (to.at - from.at)).toFixed(0)} ops/s`);
      expect(to.ops).toBeGreaterThan(from.ops);
      expect(to.violations).toBe(0);
    }
    await vm!.probe.setWorkload('idle');
    await vm!.probe.setRate(200);
    note(`at rate 0: ${rates.join(', ')}`);
  });

  it('verify reads every block and finds nothing wrong', async () => {
    const started = hostNow();
    const result = await vm!.probe.verify();
    note(`verify of ${DISK_BYTES >> 20} MiB: ${(hostNow() - started).toFixed(0)} ms on the host (guest ${result.guestMs} ms)`);
    expect(result).toEqual({ checked: DISK_BYTES / GUEST_BLOCK_BYTES, violations: 0, unreadable: 0, guestMs: expect.any(Number), reported: [] });
  });

  it('answers bad commands with an error reply', async () => {
    const refused = async (line: string): Promise<string> => {
      const err = await vm!.probe.command(line).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(GuestCommandError);
      return (err as GuestCommandError).code;
    };
    expect(await refused('frobnicate')).toBe('unknown-command');
    expect(await refused('rate fast')).toBe('bad-argument');
    expect(await refused('workload dance')).toBe('bad-argument');
    expect(await refused('verify now')).toBe('bad-argument');
    expect(await vm!.probe.command('ping')).toEqual({});
  });

  it('reports a stale block planted behind its back, and only that one', async () => {
    await vm!.probe.setWorkload('idle'); // nothing else may write while the block is stale
    const file = await fsp.open(image, 'r+');
    try {
      // The version the guest last wrote there, from the block's header; plant the one before it.
      const block = 1000;
      const current = Buffer.alloc(GUEST_BLOCK_BYTES);
      await file.read(current, 0, GUEST_BLOCK_BYTES, block * GUEST_BLOCK_BYTES);
      const { version } = readBlockHeader(current);
      expect(version).toBeGreaterThanOrEqual(1);
      await file.write(blockContent(SEED, block, version - 1), 0, GUEST_BLOCK_BYTES, block * GUEST_BLOCK_BYTES);
      const stale = await vm!.probe.verify();
      expect(stale).toMatchObject({ violations: 1, reported: [{ source: 'verify', block, expected: version, found: String(version - 1) }] });
      // Zeros where data should be: found 0 (never written).
      await file.write(Buffer.alloc(GUEST_BLOCK_BYTES), 0, GUEST_BLOCK_BYTES, block * GUEST_BLOCK_BYTES);
      expect((await vm!.probe.verify()).reported).toEqual([{ source: 'verify', block, expected: version, found: '0' }]);
      await file.write(current, 0, GUEST_BLOCK_BYTES, block * GUEST_BLOCK_BYTES);
    } finally {
      await file.close();
    }
    expect(await vm!.probe.verify()).toMatchObject({ violations: 0 });
  });

  it('sees a QMP stop of about a second as the longest heartbeat gap', async () => {
    const probe = vm!.probe;
    await probe.setWorkload('randwrite');
    await probe.waitForHeartbeat(() => true);
    const mark = probe.mark();
    await sleep(200);
    await qmp(vm!.qmpSocket, 'stop');
    const stopped = hostNow();
    await sleep(1000);
    const resuming = hostNow();
    await qmp(vm!.qmpSocket, 'cont');
    const seqAtCont = probe.latest()!.seq;
    await probe.waitForHeartbeat((hb) => hb.seq >= seqAtCont + 20);
    const gap = probe.gapSince(mark);
    const frozen = resuming - stopped;
    note(`stop for ${frozen.toFixed(0)} ms: longest heartbeat gap ${gap.longestMs.toFixed(1)} ms (${gap.heartbeats} heartbeats, ${gap.missed} missed)`);
    // No heartbeat can arrive between the stop's reply and the cont; a line sent just before the
    // stop may still be read a little after its reply, hence the 100 ms.
    expect(gap.longestMs).toBeGreaterThanOrEqual(frozen - 100);
    expect(gap.to).toBeGreaterThanOrEqual(resuming);
    expect(gap.missed).toBe(0);
  });

  it('after a kill -9, a boot with ferry.rescan=1 re-learns the versions from the disk and verifies clean', async () => {
    await vm!.probe.setWorkload('randwrite');
    await vm!.probe.setRate(0);
    await advances(['writes'], 200);
    await vm!.kill9();
    vm!.probe.close();
    vm = await bootGuest({ assets: assets(), accel, image, params: { seed: SEED, workload: 'idle', fill: true, rescan: true } });
    note(`rescan of ${DISK_BYTES >> 20} MiB at boot: ${vm.ready.rescan_ms} ms (guest clock)`);
    expect(Number(vm.ready.rescan_nonzero)).toBe(DISK_BYTES / GUEST_BLOCK_BYTES);
    expect(Number(vm.ready.rescan_unknown)).toBe(0);
    expect(Number(vm.ready.rescan_max_version)).toBeGreaterThan(1);
    expect(await vm.probe.verify()).toMatchObject({ violations: 0, checked: DISK_BYTES / GUEST_BLOCK_BYTES });
  });
});
