// The one interface between the orchestrator (host agent, migration engine) and a hypervisor.
//
// Ferry owns the disk: block-bitmaps with successor semantics, block reads on the source, block
// writes and the stale map on the destination (the paper's algorithms). The hypervisor owns memory
// and device state, as Xen did for the paper: it produces a machine-state stream that Ferry carries
// host to host over its own data plane, with controls for the downtime target, bandwidth and
// auto-converge, and a point where it is ready to freeze. Guest counters come from a guest probe.
//
// Two drivers implement it: the simulator (hypervisor/sim) and QEMU (hypervisor/qemu). Nothing above
// hypervisor/ may depend on which one runs.
import type { VmId, Workload } from '../common/types';

export type VmRunState =
  | 'incoming' // destination shell: no guest yet, waiting for the machine-state stream
  | 'running'
  | 'paused'
  | 'halted' // the guest reached its operation limit and stopped by itself (simulator)
  | 'migrated' // the machine state left for another host (QEMU's postmigrate): never runs here again unless resumed by a rollback
  | 'crashed' // the process died without a clean stop (a signal or an exit status is in `exit`)
  | 'stopped'; // no process: a clean stop, or never started

export interface VmSpec {
  vmId: VmId;
  diskBytes: number; // a whole number of 512-byte sectors
  memoryBytes: number; // a whole number of 4 KiB pages
  vcpus?: number;
  workload: Workload;
  seed: number;
  /** Guest operations per second; 0 = as fast as it can. */
  opsPerSecond: number;
  /** Write version 1 of every block at creation, so the disk is full of data (not sparse). */
  fill?: boolean;
  /** A user's own kernel, initramfs and command line (QEMU). */
  boot?: { kernel?: string; initrd?: string; append?: string };
}

/** How the last process of a VM ended, when it did not stop cleanly. */
export interface VmExit {
  code: number | null;
  signal: string | null;
  at: string;
}

export interface VmStatus {
  vmId: VmId;
  state: VmRunState;
  pid: number | null;
  diskBytes: number;
  memoryBytes: number;
  workload: Workload;
  seed: number;
  opsPerSecond: number;
  /** The disk was filled with version 1 of every block at creation (the guest's oracle must know). */
  fill: boolean;
  /** Guest write throttle in [0, 1): fraction of the guest's writes held back (disk convergence). */
  throttle: number;
  /** What runs the guest: `sim`, or QEMU's accelerator (`kvm`, `tcg`). */
  accel: string;
  exit?: VmExit;
  /** The probe's latest report (null while no guest runs or the probe has not reported yet). */
  guest: GuestReport | null;
}

/** What the guest itself says (the guest probe): counters since boot, cumulative. */
export interface GuestReport {
  ops: number;
  reads: number;
  writes: number;
  /** Reads whose data did not match the expected version. Must stay 0. */
  violations: number;
  /** Host clock (ms since the epoch) of the latest heartbeat the probe saw. */
  lastHeartbeatMs: number | null;
  /** Longest gap between consecutive heartbeats this probe saw (ms). */
  maxGapMs: number;
}

export interface VerifyResult {
  /** Blocks (guest-sized) read and checked. */
  checked: number;
  violations: number;
  /** How the check was made, in words (the simulator compares hashes with a reference run). */
  method: string;
  details?: string;
}

export interface BitmapInfo {
  name: string;
  blockBytes: number;
  persistent: boolean;
  /** false when the bitmap may have missed writes (unclean stop): it must not be trusted. */
  valid: boolean;
  dirtyCount: number;
  pendingCount: number;
}

/** A snapshot of a dirty bitmap with successor semantics: the bits stay pending until acknowledged. */
export interface BitmapSnapshot {
  generation: number;
  blockBytes: number;
  /** One bit per block, LSB first within each byte. Union of pending and current at snapshot time. */
  bits: Buffer;
  count: number;
}

export interface DiskAccess {
  readonly sizeBytes: number;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** Controls of an outgoing machine-state stream; each may change while it runs. */
export interface StreamLimits {
  /** The freeze the hypervisor aims for when it decides to stop the guest (ms). 0 holds it in precopy. */
  downtimeLimitMs: number;
  /** null = as fast as the data plane takes it. */
  bandwidthBytesPerSecond: number | null;
  /** Let the hypervisor slow the guest's CPU when its memory does not converge. */
  autoConverge: boolean;
}

export type StreamStatus = 'setup' | 'active' | 'ready' | 'completing' | 'completed' | 'failed' | 'cancelled';

export interface StreamProgress {
  status: StreamStatus;
  /** Bytes the hypervisor produced so far. */
  transferredBytes: number;
  /** Memory the hypervisor still has to send in this iteration (bytes). */
  remainingBytes: number;
  totalBytes: number;
  /** Completed passes over memory (1 = the first full pass is done). */
  iterations: number;
  /** The freeze the hypervisor expects if it stopped now (ms), or null before it knows. */
  expectedDowntimeMs: number | null;
  dirtyBytesPerSecond: number;
  /** CPU throttle the hypervisor applies (auto-converge), in [0, 1). */
  throttle: number;
  /** The hypervisor's own measure of the freeze once completed (ms). */
  downtimeMs: number | null;
  error?: string;
}

/**
 * The source side of the machine-state stream. The hypervisor writes it to a socket the agent owns;
 * Ferry reads `chunks` and carries them. With `pause-before-switchover` semantics: once the remaining
 * state fits the downtime limit the hypervisor pauses the guest and waits (`ready`); `continue()` sends
 * the rest. A stream that fails or is cancelled before it completed leaves the guest running here.
 */
export interface OutgoingStream {
  readonly chunks: AsyncIterable<Buffer>;
  /** Resolves when the guest is paused and the hypervisor waits for continue(). */
  readonly ready: Promise<void>;
  /** Resolves when the hypervisor sent everything; rejects when the stream failed or was cancelled. */
  readonly completed: Promise<StreamProgress>;
  continue(): Promise<void>;
  setLimits(limits: Partial<StreamLimits>): Promise<void>;
  progress(): Promise<StreamProgress>;
  /** Stops the stream; the guest keeps (or goes back to) running here. */
  cancel(): Promise<void>;
}

/** The destination side: Ferry writes the chunks in order; the hypervisor loads them. */
export interface IncomingStream {
  write(chunk: Buffer): Promise<void>;
  /** Resolves when the hypervisor loaded the whole stream; rejects when it failed. */
  readonly completed: Promise<void>;
  close(): void;
}

/** Guest I/O that had to wait for a stale block during postcopy (measured where the guest's I/O is served). */
export interface StaleWaitStats {
  waits: number;
  longestWaitMs: number;
  totalWaitMs: number;
}

export interface VmHandle {
  readonly vmId: VmId;
  status(): Promise<VmStatus>;
  /** On an incoming VM whose machine-state stream is loaded, too: it leaves `incoming`, paused (a cold migration's end). */
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Hold back a fraction of the guest's disk writes (disk convergence). */
  setThrottle(fraction: number): Promise<void>;

  // ---- the disk, Ferry's side ----
  addBitmap(name: string, opts: { blockBytes: number; persistent: boolean }): Promise<void>;
  removeBitmap(name: string): Promise<void>;
  listBitmaps(): Promise<BitmapInfo[]>;
  /** The dirty set so far, frozen: the next writes go to a successor; the bits stay pending until ackBitmap. */
  snapshotBitmap(name: string): Promise<BitmapSnapshot>;
  ackBitmap(name: string, generation: number): Promise<void>;
  /** The live disk: reads on a source, writes on an incoming destination. */
  openDisk(): Promise<DiskAccess>;

  // ---- memory and devices, the hypervisor's side ----
  migrateOut(limits: StreamLimits): Promise<OutgoingStream>;
  /** Only on an incoming VM that has not loaded a stream yet. */
  migrateIn(): Promise<IncomingStream>;

  // ---- postcopy, on the destination ----
  /** Mark blocks stale before the guest runs: reads of them wait for a delivery; whole-block writes make them fresh. */
  setStale(bitmap: BitmapSnapshot): Promise<void>;
  /** Deliver fetched blocks; a block that is no longer stale (newer guest write) is discarded. Returns how many were applied. */
  deliverBlocks(blockBytes: number, items: { block: number; data: Buffer }[]): Promise<number>;
  /** Blocks the guest is waiting for right now; the callback fires for every new one. */
  onBlockNeeded(cb: (block: number) => void): () => void;
  staleBlocks(): Promise<number[]>;
  staleWaits(): Promise<StaleWaitStats>;
  /** No block is stale any more: the guest's disk is the local image alone from now on. */
  endPostcopy(): Promise<void>;

  // ---- the guest probe ----
  /** The first heartbeat the guest sends at or after `sinceMs` (host clock), waiting up to `timeoutMs`. */
  nextHeartbeat(sinceMs: number, timeoutMs: number): Promise<number | null>;
  /** The guest checks every block of its disk against what it wrote. */
  verify(): Promise<VerifyResult>;

  close(): void;
}

export interface CreateOptions {
  /** A destination shell: its state comes from a machine-state stream. */
  incoming?: boolean;
  /** Build on the disk image that `destroy(vm, { keepDisk: true })` left (an incremental-migration base). */
  reuseDisk?: boolean;
}

export interface HypervisorDriver {
  /** `sim` or `qemu`: for logs and `vm inspect`, never for decisions above hypervisor/. */
  readonly kind: string;
  /** How guests run on this host (for the agent's log and `vm inspect`). */
  describe(): Promise<{ kind: string; accel: string; version: string }>;
  create(spec: VmSpec, opts?: CreateOptions): Promise<VmStatus>;
  /**
   * Start the VM process (detached: it outlives the agent). A fresh VM starts its guest (paused with
   * `paused`); an incoming one waits for a stream. Starting a VM whose process is alive attaches to it.
   */
  start(vm: VmId, opts?: { paused?: boolean }): Promise<VmHandle>;
  /** Attach to a running VM process (after an agent restart). Throws VmNotFound / VmNotRunning. */
  attach(vm: VmId): Promise<VmHandle>;
  /** Clean stop. */
  stop(vm: VmId): Promise<void>;
  /** Kill the process at once (no clean stop, not a crash); the VM's files stay. */
  kill(vm: VmId): Promise<void>;
  /** Kill the process and delete the VM's files (`keepDisk`: all but the disk image). */
  destroy(vm: VmId, opts?: { keepDisk?: boolean }): Promise<void>;
  list(): Promise<VmStatus[]>;
  inspect(vm: VmId): Promise<VmStatus>;
  exists(vm: VmId): Promise<boolean>;
  /** Path of the VM's raw disk image (bases kept for incremental migration; the postcopy push reads it). */
  diskPath(vm: VmId): string;
  /** The image alone, with no VM process (a migrated VM's disk as it was at the freeze). */
  openImage(vm: VmId): Promise<DiskAccess>;
  /** Calls `cb` when a VM process of this host exits without a clean stop. */
  onCrash(cb: (vm: VmId, exit: VmExit) => void): () => void;
}
