// VmHandle of a QEMU VM: QMP for the hypervisor's side (run state, dirty bitmaps, the migration
// stream, the disk's block graph), QEMU's NBD server for reads of the live disk and of bitmaps, the
// guest probe for what the guest says, and the postcopy disk server for stale blocks.
import { setTimeout as sleep } from 'node:timers/promises';
import type { VmId } from '../../common/types';
import type {
  BitmapInfo,
  BitmapSnapshot,
  DiskAccess,
  IncomingStream,
  OutgoingStream,
  StaleWaitStats,
  StreamLimits,
  VerifyResult,
  VmHandle,
  VmRunState,
  VmStatus,
} from '../driver';
import { HypervisorError } from '../errors';
import { FileDiskAccess } from '../file-disk';
import { DISK_DEVICE } from './command-line';
import { DirtyBitmaps } from './dirty-bitmaps';
import { DiskExports } from './disk-exports';
import type { GuestProbe } from './guest-probe';
import { cancelOrphanStream, migrateIn, migrateOut } from './machine-stream';
import type { QmpClient } from './qmp/client';
import type { PostcopyDisk } from './postcopy-disk';
import type { QemuVmConfig, QemuVmPaths } from './vm-files';

/** The QOM path of the virtio-blk device's block backend (what I/O throttling and block stats name). */
const DEVICE_PATH = `/machine/peripheral/${DISK_DEVICE}/virtio-backend`;

/** One agent's connection to one QEMU process, shared by every handle (QEMU's QMP takes one client). */
export interface QemuConnection {
  pid: number;
  qmp: QmpClient;
  probe: GuestProbe | null;
  bitmaps: DirtyBitmaps;
  exports: DiskExports;
  postcopy: PostcopyDisk;
}

export function createConnection(pid: number, qmp: QmpClient, probe: GuestProbe | null, paths: QemuVmPaths, diskBytes: number, postcopy: PostcopyDisk): QemuConnection {
  const exports = new DiskExports(qmp, paths.exportSocket);
  return { pid, qmp, probe, exports, bitmaps: new DirtyBitmaps(qmp, exports, diskBytes), postcopy };
}

/** QEMU's run states as Ferry's (QEMU's own name stays in the status for the operator). */
export function runState(qemu: string, incoming: boolean): VmRunState {
  switch (qemu) {
    case 'running':
      return 'running';
    case 'inmigrate':
      return 'incoming';
    case 'prelaunch':
      return incoming ? 'incoming' : 'paused';
    case 'postmigrate':
      return 'migrated';
    default:
      return 'paused'; // paused, finish-migrate (the switchover), io-error, suspended, ...
  }
}

export class QemuVmHandle implements VmHandle {
  constructor(
    readonly vmId: VmId,
    private readonly conn: QemuConnection,
    private readonly paths: QemuVmPaths,
    private readonly config: () => QemuVmConfig,
    private readonly setConfig: (update: Partial<QemuVmConfig>) => void,
    private readonly accel: string,
  ) {}

  get pid(): number {
    return this.conn.pid;
  }

  private get qmp(): QmpClient {
    return this.conn.qmp;
  }

  async status(): Promise<VmStatus> {
    const { spec, incoming } = this.config();
    const q = await this.qmp.execute<{ status: string; running: boolean }>('query-status');
    const hb = this.conn.probe?.latest() ?? null;
    return {
      vmId: spec.vmId,
      state: runState(q.status, incoming),
      pid: this.conn.pid,
      diskBytes: spec.diskBytes,
      memoryBytes: spec.memoryBytes,
      workload: spec.workload,
      seed: spec.seed,
      opsPerSecond: spec.opsPerSecond,
      fill: spec.fill === true,
      throttle: this.throttle,
      accel: this.accel,
      guest: hb
        ? { ops: hb.ops, reads: hb.reads, writes: hb.writes, violations: hb.violations, lastHeartbeatMs: hb.at, maxGapMs: this.conn.probe!.maxGapMs }
        : null,
    };
  }

  private throttle = 0;

  async pause(): Promise<void> {
    const { status } = await this.qmp.execute<{ status: string }>('query-status');
    if (status === 'inmigrate' || (status === 'prelaunch' && this.config().incoming)) {
      throw new HypervisorError('InvalidState', `pause: VM ${this.vmId} is incoming and has no guest to pause before its machine-state stream is loaded`);
    }
    await this.qmp.execute('stop');
    // A loaded incoming VM that stays paused (a cold migration): it is this host's VM from now on.
    if (this.config().incoming) this.setConfig({ incoming: false });
  }

  async resume(): Promise<void> {
    await cancelOrphanStream(this.qmp, this.vmId);
    await this.qmp.execute('cont');
    if (this.config().incoming) this.setConfig({ incoming: false });
  }

  /**
   * Holds back guest writes: QEMU's I/O throttling of the disk at (1 − f) of the write rate measured
   * over the last half second (a guest that writes nothing needs no throttle).
   */
  async setThrottle(fraction: number): Promise<void> {
    if (!(fraction >= 0 && fraction < 1)) throw new HypervisorError('InvalidArgument', `throttle ${fraction}: use a fraction in [0, 1)`);
    let iops = 0;
    if (fraction > 0) {
      const before = await this.writeOps();
      await sleep(500);
      const rate = ((await this.writeOps()) - before) * 2;
      iops = Math.max(1, Math.round(rate * (1 - fraction)));
    }
    await this.qmp.execute('block_set_io_throttle', { id: DEVICE_PATH, bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: iops });
    this.throttle = fraction;
  }

  private async writeOps(): Promise<number> {
    const stats = await this.qmp.execute<{ qdev?: string; stats: { wr_operations: number } }[]>('query-blockstats');
    return stats.find((s) => s.qdev?.startsWith(DEVICE_PATH))?.stats.wr_operations ?? 0;
  }

  addBitmap(name: string, opts: { blockBytes: number; persistent: boolean }): Promise<void> {
    return this.conn.bitmaps.add(name, opts.blockBytes);
  }

  removeBitmap(name: string): Promise<void> {
    return this.conn.bitmaps.remove(name);
  }

  listBitmaps(): Promise<BitmapInfo[]> {
    return this.conn.bitmaps.list();
  }

  snapshotBitmap(name: string): Promise<BitmapSnapshot> {
    return this.conn.bitmaps.snapshot(name);
  }

  ackBitmap(name: string, generation: number): Promise<void> {
    return this.conn.bitmaps.ack(name, generation);
  }

  /** An incoming VM's image is Ferry's to write until the guest runs; a running VM's is read through QEMU. */
  async openDisk(): Promise<DiskAccess> {
    if (this.config().incoming) return FileDiskAccess.open(this.paths.disk);
    return this.conn.exports.openDisk(this.config().spec.diskBytes);
  }

  /**
   * QEMU's auto-converge only under KVM: under TCG (QEMU 7.2) a guest throttled by it while the
   * stream is read fast comes out of the migration with its memory corrupted (its kernel oopses in a
   * timer interrupt, or it hangs); the same migration without auto-converge is clean.
   */
  migrateOut(limits: StreamLimits): Promise<OutgoingStream> {
    return migrateOut(this.qmp, this.vmId, { ...limits, autoConverge: limits.autoConverge && this.accel === 'kvm' });
  }

  async migrateIn(): Promise<IncomingStream> {
    await this.conn.postcopy.prepare();
    return migrateIn(this.qmp, this.vmId);
  }

  setStale(bitmap: BitmapSnapshot): Promise<void> {
    return this.conn.postcopy.begin(this.qmp, bitmap);
  }

  deliverBlocks(blockBytes: number, items: { block: number; data: Buffer }[]): Promise<number> {
    return this.conn.postcopy.deliver(blockBytes, items);
  }

  onBlockNeeded(cb: (block: number) => void): () => void {
    return this.conn.postcopy.onBlockNeeded(cb);
  }

  staleBlocks(): Promise<number[]> {
    return this.conn.postcopy.staleBlocks();
  }

  staleWaits(): Promise<StaleWaitStats> {
    return this.conn.postcopy.waitStats();
  }

  endPostcopy(): Promise<void> {
    return this.conn.postcopy.end(this.qmp);
  }

  async nextHeartbeat(sinceMs: number, timeoutMs: number): Promise<number | null> {
    if (!this.conn.probe) return null;
    return this.conn.probe.nextHeartbeat(sinceMs, timeoutMs);
  }

  async verify(): Promise<VerifyResult> {
    const probe = this.conn.probe;
    if (!probe) {
      throw new HypervisorError('InvalidState', `VM ${this.vmId} runs a kernel of its own, not Ferry's guest program: it has no read check to run`);
    }
    const r = await probe.verify({ timeoutMs: 600_000 });
    return {
      checked: r.checked,
      violations: r.violations + r.unreadable,
      method: "qemu: the guest program read every block of its disk and checked it against the version it wrote (O_DIRECT)",
      details: `${r.checked} blocks read in ${r.guestMs} ms of guest time; ${r.violations} did not hold what the guest wrote, ${r.unreadable} unreadable${
        r.reported.length > 0 ? `; first: ${r.reported.slice(0, 5).map((v) => `block ${v.block} expected ${v.expected} found ${v.found}`).join(', ')}` : ''
      }`,
    };
  }

  /** A clean stop: QEMU flushes the disk and exits (the guest is not asked; its disk writes are synchronous). */
  async stopProcess(): Promise<void> {
    await this.qmp.execute('quit');
  }

  close(): void {
    // The connection is the driver's, shared with every other handle of this VM.
  }
}
