// The peer of the QEMU benchmark: QEMU's own storage + memory migration with no Ferry, as libvirt's
// `virsh migrate --live --copy-storage-all` drives it (shared/DESIGN.md, "The peer to measure
// against"). Two bare qemu-system-x86_64 processes with Ferry's command line (command-line.ts); the
// destination starts with -incoming defer -S on an empty raw image of the same size and exports it
// over NBD; the source mirrors its disk there until READY, then migrates memory and device state
// over a Unix socket; the mirror is completed with block-job-cancel and the destination continues.
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { qemuArgs, DISK_NODE, type QemuAccel } from '../hypervisor/qemu/command-line';
import { fillImage } from '../hypervisor/qemu/guest-content';
import { guestKernelCmdline, type GuestWorkload } from '../hypervisor/qemu/guest-params';
import { GuestProbe, hostNow, longestGap } from '../hypervisor/qemu/guest-probe';
import { QmpClient } from '../hypervisor/qemu/qmp/client';

export interface PeerAssets {
  qemuSystem: string;
  kernel: string;
  initrd: string;
}

export interface PeerOptions {
  assets: PeerAssets;
  accel: QemuAccel;
  /** An empty directory of this run: images, sockets, logs (removed by the caller). */
  dir: string;
  diskBytes: number;
  memoryBytes: number;
  workload: GuestWorkload;
  opsPerSecond: number;
  seed: number;
  /** Gives up on a mirror or migration step after this long (ms). */
  timeoutMs: number;
  log: (line: string) => void;
}

/** What libvirt leaves QEMU with: no bandwidth cap (QEMU's own default is 128 MiB/s), QEMU's default downtime limit. */
export const PEER_MIGRATION_PARAMETERS = { 'max-bandwidth': 64 * 1024 ** 3 } as const;

export interface PeerRun {
  /** Mirror start to the destination running (`cont` answered). */
  totalMs: number;
  /** blockdev-mirror to BLOCK_JOB_READY. */
  mirrorMs: number;
  /** migrate to `completed` on the source. */
  migrateMs: number;
  /** QEMU's `downtime` from query-migrate on the source. */
  qemuDowntimeMs: number | null;
  /** The longest gap between guest heartbeats, source and destination probes merged, from the mirror's start to the destination's first heartbeat. */
  heartbeatDowntimeMs: number;
  /** The source's last heartbeat to the destination's first: the switchover alone (the longest gap may fall elsewhere, e.g. in the mirror). */
  switchoverGapMs: number | null;
  /** The disk image's size (what a full mirror must send at least). */
  diskBytes: number;
  /** Bytes the mirror job copied (its final offset: the image plus what the guest re-dirtied). */
  mirrorJobBytes: number;
  /** ram.transferred of the memory migration. */
  memoryBytes: number;
  verify: { checked: number; violations: number; unreadable: number; guestMs: number };
}

interface QueryMigrate {
  status?: string;
  downtime?: number;
  'error-desc'?: string;
  ram?: { transferred: number };
}

interface BlockJob {
  device: string;
  offset: number;
  len: number;
}

const MIRROR_JOB = 'peer-mirror';
const MIRROR_TARGET = 'peer-target';
const EXPORT_NAME = 'disk0';

class PeerQemu {
  private stderr = '';
  private readonly exited: Promise<void>;

  private constructor(
    readonly name: string,
    readonly child: ChildProcess,
    readonly qmpSocket: string,
    readonly probeSocket: string,
    readonly consoleLog: string,
  ) {
    child.stderr?.on('data', (d: Buffer) => (this.stderr = (this.stderr + d.toString()).slice(-4000)));
    this.exited = new Promise((resolve) => {
      child.once('exit', () => resolve());
      child.once('error', () => resolve());
    });
  }

  static start(o: PeerOptions, name: string, image: string, incoming: boolean): PeerQemu {
    const file = (suffix: string) => path.join(o.dir, `${name}-${suffix}`);
    const files = { qmpSocket: file('qmp.sock'), probeSocket: file('probe.sock'), consoleLog: file('console.log'), pidFile: file('qemu.pid') };
    const args = qemuArgs({
      vmId: `peer-${name}`,
      memoryBytes: o.memoryBytes,
      vcpus: 1,
      accel: o.accel,
      kernel: o.assets.kernel,
      initrd: o.assets.initrd,
      append: guestKernelCmdline({ seed: o.seed, workload: o.workload, rate: o.opsPerSecond, fill: true }),
      ...files,
      disk: { kind: 'file', path: image },
      incoming,
      paused: incoming,
    });
    const child = spawn(o.assets.qemuSystem, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    return new PeerQemu(name, child, files.qmpSocket, files.probeSocket, files.consoleLog);
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** What QEMU and the guest said last, for an error message. */
  async said(): Promise<string> {
    const consoleText = await fs.readFile(this.consoleLog, 'latin1').catch(() => '');
    return `--- ${this.name} QEMU stderr ---\n${this.stderr.trim()}\n--- ${this.name} console ---\n${consoleText.slice(-2000)}`;
  }

  async kill(): Promise<void> {
    if (this.running) this.child.kill('SIGKILL');
    await this.exited;
  }
}

async function pollMigration(qmp: QmpClient, deadline: number): Promise<QueryMigrate> {
  for (;;) {
    const q = await qmp.execute<QueryMigrate>('query-migrate');
    if (q.status === 'completed') return q;
    if (q.status === 'failed' || q.status === 'cancelled') throw new Error(`QEMU's migration ${q.status}: ${q['error-desc'] ?? 'no error description'}`);
    if (hostNow() > deadline) throw new Error(`QEMU's migration did not complete in time (status ${q.status ?? 'none'})`);
    await sleep(50);
  }
}

/** One bare-QEMU migration of a fresh guest, source to destination, then the guest's read check on the destination. */
export async function runPeer(o: PeerOptions): Promise<PeerRun> {
  const srcImage = path.join(o.dir, 'source.img');
  const dstImage = path.join(o.dir, 'destination.img');
  await fillImage(srcImage, o.seed, o.diskBytes);
  const empty = await fs.open(dstImage, 'w');
  await empty.truncate(o.diskBytes).finally(() => empty.close());

  const procs: PeerQemu[] = [];
  const qmps: QmpClient[] = [];
  const probes: GuestProbe[] = [];
  try {
    const src = PeerQemu.start(o, 'source', srcImage, false);
    procs.push(src);
    const dst = PeerQemu.start(o, 'destination', dstImage, true);
    procs.push(dst);
    const srcQmp = await QmpClient.connect(src.qmpSocket, { timeoutMs: 30_000, commandTimeoutMs: o.timeoutMs });
    qmps.push(srcQmp);
    const dstQmp = await QmpClient.connect(dst.qmpSocket, { timeoutMs: 30_000, commandTimeoutMs: o.timeoutMs });
    qmps.push(dstQmp);
    const srcProbe = await GuestProbe.connect(src.probeSocket);
    probes.push(srcProbe);
    const dstProbe = await GuestProbe.connect(dst.probeSocket);
    probes.push(dstProbe);
    await srcProbe.waitReady({ timeoutMs: 180_000 });
    // As for Ferry's VMs: the workload is under way before the migration starts.
    await srcProbe.waitForHeartbeat((hb) => o.opsPerSecond === 0 || hb.ops > 20, { timeoutMs: 120_000 });

    const deadline = hostNow() + o.timeoutMs;
    const nbdSocket = path.join(o.dir, 'nbd.sock');
    const migrationSocket = path.join(o.dir, 'migration.sock');
    const t0 = hostNow();
    await dstQmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSocket } } });
    await dstQmp.execute('block-export-add', { type: 'nbd', id: 'peer-export', 'node-name': DISK_NODE, name: EXPORT_NAME, writable: true });
    await srcQmp.execute('blockdev-add', { driver: 'nbd', 'node-name': MIRROR_TARGET, server: { type: 'unix', path: nbdSocket }, export: EXPORT_NAME });
    const mark = srcQmp.eventMark();
    await srcQmp.execute('blockdev-mirror', { 'job-id': MIRROR_JOB, device: DISK_NODE, target: MIRROR_TARGET, sync: 'full' });
    await srcQmp.waitEvent('BLOCK_JOB_READY', (d) => d.device === MIRROR_JOB, Math.max(1, deadline - hostNow()), mark);
    const mirrorMs = hostNow() - t0;
    o.log(`    mirror ready after ${(mirrorMs / 1000).toFixed(1)} s; migrating memory`);

    await srcQmp.execute('migrate-set-parameters', { ...PEER_MIGRATION_PARAMETERS });
    const uri = `unix:${migrationSocket}`;
    await dstQmp.execute('migrate-incoming', { uri });
    const m0 = hostNow();
    await srcQmp.execute('migrate', { uri });
    const migrated = await pollMigration(srcQmp, deadline);
    const migrateMs = hostNow() - m0;

    const jobs = await srcQmp.execute<BlockJob[]>('query-block-jobs');
    const job = jobs.find((j) => j.device === MIRROR_JOB);
    const cancelMark = srcQmp.eventMark();
    await srcQmp.execute('block-job-cancel', { device: MIRROR_JOB });
    const done = await srcQmp.waitEvent('BLOCK_JOB_COMPLETED', (d) => d.device === MIRROR_JOB, Math.max(1, deadline - hostNow()), cancelMark);
    if (done.data.error) throw new Error(`the mirror failed at completion: ${String(done.data.error)}`);
    await dstQmp.execute('nbd-server-stop');
    const contAt = hostNow();
    await dstQmp.execute('cont');
    const totalMs = hostNow() - t0;

    const firstBeat = await dstProbe.nextHeartbeat(contAt, 30_000);
    if (firstBeat === null) throw new Error(`no heartbeat from the guest on the destination within 30 s of cont\n${await dst.said()}`);
    const gap = longestGap([srcProbe, dstProbe], t0, firstBeat);
    const lastSourceBeat = srcProbe.latest()?.at ?? null;
    const verify = await dstProbe.verify();
    return {
      totalMs,
      mirrorMs,
      migrateMs,
      qemuDowntimeMs: migrated.downtime ?? null,
      heartbeatDowntimeMs: gap.longestMs,
      switchoverGapMs: lastSourceBeat === null ? null : firstBeat - lastSourceBeat,
      diskBytes: o.diskBytes,
      mirrorJobBytes: job?.offset ?? o.diskBytes,
      memoryBytes: migrated.ram?.transferred ?? 0,
      verify: { checked: verify.checked, violations: verify.violations, unreadable: verify.unreadable, guestMs: verify.guestMs },
    };
  } catch (err) {
    const said = (await Promise.all(procs.map((p) => p.said()))).join('\n');
    throw new Error(`bare-QEMU migration failed: ${(err as Error).message}\n${said}`);
  } finally {
    for (const p of probes) p.close();
    for (const q of qmps) await q.close().catch(() => undefined);
    for (const p of procs) await p.kill();
  }
}
