// The one interface between the orchestrator (host agent, activities) and a hypervisor.
// The simulated hypervisor (hypervisor/sim) implements it today; a QEMU driver fits the same shape:
//   tracking/bitmaps  -> QMP block-dirty-bitmap-add/-remove, dirty-bitmap snapshot via successor bitmaps
//   disk access       -> NBD export of the running disk (source) / NBD server target (destination)
//   pages, state      -> the migration stream (QEMU owns memory; pages stay opaque to Ferry)
//   incoming/stale    -> -incoming defer + a copy-on-read filter for postcopy of the disk
import type { VmId, Workload } from '../common/types';

export type VmRunState =
  | 'incoming' // destination shell: no guest running, waiting for memory, state and the stale bitmap
  | 'running'
  | 'paused'
  | 'halted' // the guest reached its operation limit (runUntil) and stopped by itself
  | 'stopped'; // no process (clean stop, crash, or never started)

export interface VmSpec {
  vmId: VmId;
  diskBytes: number; // a whole number of 512-byte sectors
  memoryBytes: number; // a whole number of 4 KiB pages
  workload: Workload;
  seed: number;
  /** Guest operations per second; 0 = as fast as it can. */
  opsPerSecond: number;
  /** Write version 1 of every block at creation, so the disk is full of data (not sparse). */
  fill?: boolean;
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
  /** Guest operations completed since creation (part of the migrated CPU state). */
  ops: number;
  /** Guest reads whose data did not match the expected version. Must stay 0. */
  violations: number;
  /** Longest gap between consecutive guest operations seen by this process (ms). */
  maxGapMs: number;
  /** Gap between the last operation before the most recent loadState and the first one after it (ms). */
  resumeGapMs: number | null;
  /** Guest reads that waited for a stale block (postcopy, on-demand). */
  staleWaits: number;
  /** Blocks still marked stale (incoming/postcopy mode). */
  staleBlocks: number;
  /** Guest write throttle in [0, 1): fraction of time the guest is held back (auto-converge). */
  throttle: number;
}

export interface BitmapInfo {
  name: string;
  blockBytes: number;
  persistent: boolean;
  /** false after an unclean stop: the bitmap may miss writes and must not be trusted. */
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

/** Consecutive pages: [first page, count]. */
export type PageRun = [first: number, count: number];

export interface DiskAccess {
  readonly sizeBytes: number;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

export interface VmHandle {
  readonly vmId: VmId;
  status(): Promise<VmStatus>;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Run the guest until exactly `ops` operations are done, then halt (for reproducible hashes). */
  runUntil(ops: number): Promise<void>;
  setThrottle(fraction: number): Promise<void>;

  /** CPU/device state (includes the guest generator state). Only while paused/halted. */
  saveState(): Promise<Buffer>;
  loadState(state: Buffer): Promise<void>;

  // Disk block-bitmaps
  addBitmap(name: string, opts: { blockBytes: number; persistent: boolean }): Promise<void>;
  removeBitmap(name: string): Promise<void>;
  listBitmaps(): Promise<BitmapInfo[]>;
  snapshotBitmap(name: string): Promise<BitmapSnapshot>;
  ackBitmap(name: string, generation: number): Promise<void>;

  // Memory (pages of PAGE_BYTES), with one dirty log of the same successor semantics
  startMemoryLog(): Promise<void>;
  stopMemoryLog(): Promise<void>;
  snapshotMemoryLog(): Promise<BitmapSnapshot>;
  ackMemoryLog(generation: number): Promise<void>;
  readPages(first: number, count: number): Promise<Buffer>;
  writePages(first: number, data: Buffer): Promise<void>;
  /** Scattered pages in one round trip (the dirty-page path): the pages of every run, concatenated in order. */
  readPageRuns(runs: PageRun[]): Promise<Buffer>;
  writePageRuns(runs: PageRun[], data: Buffer): Promise<void>;

  // Incoming / postcopy (destination)
  /** Mark blocks stale: guest reads of them wait for a delivery; whole-block writes make them fresh. */
  setStale(bitmap: BitmapSnapshot): Promise<void>;
  /** Deliver fetched blocks; a block that is no longer stale (newer guest write) is discarded. Returns how many were applied. */
  deliverBlocks(blockBytes: number, items: { block: number; data: Buffer }[]): Promise<number>;
  /** Blocks the guest is waiting for right now; the callback fires for every new one. */
  onBlockNeeded(cb: (block: number) => void): () => void;
  staleBlocks(): Promise<number[]>;

  /** sha256 of the disk image and of the memory, hex; only while paused/halted. */
  hashes(): Promise<{ disk: string; memory: string }>;
  /** Direct access to the disk image (NBD export for QEMU). */
  openDisk(): Promise<DiskAccess>;
  close(): void;
}

export interface HypervisorDriver {
  readonly kind: string;
  /**
   * Create the VM's disk (sparse) and metadata; `incoming` makes a destination shell instead of a fresh guest.
   * `reuseDisk` builds on the disk.img kept by `destroy(vm, { keepDisk: true })` (an incremental-migration base).
   */
  create(spec: VmSpec, opts?: { incoming?: boolean; reuseDisk?: boolean }): Promise<VmStatus>;
  /**
   * Start the VM process (detached: it outlives the agent). A fresh VM starts running its guest (or paused with
   * `paused`); an incoming one waits. Starting a VM whose process is alive attaches to it.
   */
  start(vm: VmId, opts?: { paused?: boolean }): Promise<VmHandle>;
  /** Attach to a running VM process (after an agent restart). Throws VmNotFound / VmNotRunning. */
  attach(vm: VmId): Promise<VmHandle>;
  /** Clean stop: persistent bitmaps are saved and stay valid. */
  stop(vm: VmId): Promise<void>;
  /** Kill the process and delete the VM's files. */
  destroy(vm: VmId, opts?: { keepDisk?: boolean }): Promise<void>;
  list(): Promise<VmStatus[]>;
  inspect(vm: VmId): Promise<VmStatus>;
  exists(vm: VmId): Promise<boolean>;
  /** Path of the VM's raw disk image (for bases kept for incremental migration). */
  diskPath(vm: VmId): string;
}
