// The deterministic guest workload. Operation i is a pure function of (spec, i) (a counter-based random
// generator: the generator state is the operation counter), so the disk and memory after N operations
// are the same whether or not the guest was paused, saved, loaded or migrated in between.
//
// Memory layout: bytes [0, 4*blocks) hold the guest's version table (uint32 LE per 4 KiB guest block),
// so the table migrates with the memory; the data area (from the next page on) receives 16 bytes per
// operation at a pseudo-random place, so memory gets dirtied like a real guest's. The idle guest only
// ticks: its stamp always lands in the first slot of the data area (one dirty page).
import { constants as bufferConstants } from 'node:buffer';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { PAGE_BYTES, SECTOR_BYTES, WORKLOADS, type VmId, type Workload } from '../../common/types';
import type { VmSpec } from '../driver';
import { GUEST_BLOCK_BYTES, fillBlockWords, hashString, mixIndex } from './content';
import { HypervisorError } from '../errors';

export const SEQ_RUN_BLOCKS = 64; // seqwrite: 256 KiB per operation
const MIXED_WINDOW_BLOCKS = 1024; // mixed: a 4 MiB working window ...
const MIXED_DRIFT_OPS = 8; // ... that moves one block every 8 operations
const HOT_SET_BLOCKS = 256; // readmostly: 1 MiB hot set
const MEM_STAMP_BYTES = 16;
export const MAX_DISK_BYTES = 2 ** 44; // 2^32 guest blocks: block numbers stay 32-bit
/** The memory is one buffer in the VM process: it must fit in a Buffer and in this host's RAM. */
export const maxMemoryBytes = (): number => Math.min(bufferConstants.MAX_LENGTH, os.totalmem());

export interface GuestLayout {
  /** 4 KiB guest blocks (the last may be partial). */
  blocks: number;
  tableBytes: number;
  dataOffset: number;
  dataBytes: number;
}

export function guestLayout(spec: Pick<VmSpec, 'diskBytes' | 'memoryBytes'>): GuestLayout {
  const blocks = Math.ceil(spec.diskBytes / GUEST_BLOCK_BYTES);
  const tableBytes = blocks * 4;
  const dataOffset = Math.ceil(tableBytes / PAGE_BYTES) * PAGE_BYTES;
  return { blocks, tableBytes, dataOffset, dataBytes: spec.memoryBytes - dataOffset };
}

/** Smallest memory that holds the version table of a disk plus one page of data. */
export const minMemoryBytes = (diskBytes: number): number =>
  Math.ceil((Math.ceil(diskBytes / GUEST_BLOCK_BYTES) * 4) / PAGE_BYTES) * PAGE_BYTES + PAGE_BYTES;

const isInt = (v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): v is number =>
  typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max;

/** Throws InvalidArgument naming the fix. */
export function validateSpec(spec: VmSpec): void {
  const bad = (msg: string): never => {
    throw new HypervisorError('InvalidArgument', msg);
  };
  if (!spec || typeof spec !== 'object') bad('spec must be an object');
  if (spec.boot) bad('a kernel, initramfs or command line of your own needs the QEMU hypervisor (agent --hypervisor qemu): the simulator boots no kernel');
  if (spec.vcpus !== undefined && spec.vcpus !== 1) bad(`vcpus ${spec.vcpus}: the simulated guest has one; use the QEMU hypervisor for more`);
  if (typeof spec.vmId !== 'string' || !/^[a-z0-9][a-z0-9._-]{0,62}$/.test(spec.vmId)) {
    bad(`vmId ${JSON.stringify(spec.vmId)}: use 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit`);
  }
  if (!isInt(spec.diskBytes, SECTOR_BYTES, MAX_DISK_BYTES) || spec.diskBytes % SECTOR_BYTES !== 0) {
    bad(`diskBytes ${spec.diskBytes}: use a whole number of ${SECTOR_BYTES}-byte sectors, at most ${MAX_DISK_BYTES}`);
  }
  if (!isInt(spec.memoryBytes, PAGE_BYTES) || spec.memoryBytes % PAGE_BYTES !== 0) {
    bad(`memoryBytes ${spec.memoryBytes}: use a whole number of ${PAGE_BYTES}-byte pages`);
  }
  if (spec.memoryBytes > maxMemoryBytes()) {
    bad(`memoryBytes ${spec.memoryBytes} is more than this host can give one VM (${maxMemoryBytes()} bytes): use less memory or another host`);
  }
  const min = minMemoryBytes(spec.diskBytes);
  if (spec.memoryBytes < min) {
    bad(`memoryBytes ${spec.memoryBytes} is too small for a ${spec.diskBytes}-byte disk: the guest needs at least ${min} (version table + one page)`);
  }
  if (!WORKLOADS.includes(spec.workload)) bad(`workload ${JSON.stringify(spec.workload)}: use one of ${WORKLOADS.join(', ')}`);
  if (!isInt(spec.seed, 0)) bad(`seed ${spec.seed}: use a non-negative integer`);
  if (typeof spec.opsPerSecond !== 'number' || !Number.isFinite(spec.opsPerSecond) || spec.opsPerSecond < 0) {
    bad(`opsPerSecond ${spec.opsPerSecond}: use a number >= 0 (0 = unlimited)`);
  }
  if (spec.fill !== undefined && typeof spec.fill !== 'boolean') bad('fill must be a boolean');
}

/** Synchronous positional disk I/O (a kept-open fd: the page cache makes it fast). */
export interface GuestDisk {
  read(buf: Buffer, length: number, offset: number): void;
  write(buf: Buffer, length: number, offset: number): void;
}

export function fdDisk(fd: number): GuestDisk {
  return {
    read(buf, length, offset) {
      let done = 0;
      while (done < length) {
        const n = fs.readSync(fd, buf, done, length - done, offset + done);
        if (n === 0) {
          buf.fill(0, done, length); // past EOF of a sparse image reads as zeros
          return;
        }
        done += n;
      }
    },
    write(buf, length, offset) {
      let done = 0;
      while (done < length) done += fs.writeSync(fd, buf, done, length - done, offset + done);
    },
  };
}

export interface GuestHooks {
  /** Called before a disk write is issued (block-bitmap tracking). */
  beforeDiskWrite?(offset: number, length: number): void;
  /** Called after guest memory changed (memory dirty log). */
  onMemoryWrite?(offset: number, length: number): void;
  onViolation?(block: number, expectedVersion: number, op: number): void;
}

export const OpKind = { Memory: 0, Read: 1, Write: 2 } as const;
export type OpKind = (typeof OpKind)[keyof typeof OpKind];

/** One planned guest operation over guest blocks [first, first+count). Reused between operations. */
export interface GuestOp {
  index: number;
  kind: OpKind;
  first: number;
  count: number;
  r1: number;
  r2: number;
  r3: number;
}

export interface GuestCpuState {
  format: 'ferry-cpu';
  version: 1;
  vmId: string;
  workload: Workload;
  seed: number;
  diskBytes: number;
  memoryBytes: number;
  opsPerSecond: number;
  ops: number;
  reads?: number;
  writes?: number;
  violations: number;
  /** Wall-clock ms of the last operation (null before the first). */
  lastOpAt: number | null;
  /** runUntil target that travels with the guest (null = none). */
  haltAt: number | null;
}

export const nowMs = (): number => performance.timeOrigin + performance.now();

export function hotBlocks(spec: Pick<VmSpec, 'vmId' | 'seed' | 'diskBytes'>): number[] {
  const blocks = Math.ceil(spec.diskBytes / GUEST_BLOCK_BYTES);
  const key = seedKey(spec.vmId, spec.seed);
  const out: number[] = [];
  for (let k = 0; k < Math.min(blocks, HOT_SET_BLOCKS); k++) out.push(mixIndex(key ^ 0x4f1bbcdc, k) % blocks);
  return out;
}

const seedKey = (vmId: string, seed: number): number => mixIndex(hashString(vmId), seed);

export class Guest {
  readonly layout: GuestLayout;
  readonly table: Uint32Array;
  ops = 0;
  reads = 0;
  writes = 0;
  violations = 0;
  lastOpAt: number | null = null;
  haltAt: number | null = null;
  maxGapMs = 0;
  resumeGapMs: number | null = null;
  opsPerSecond: number;
  private measureResumeGap = false;
  private readonly vmHash: number;
  private readonly key: number;
  private readonly op: GuestOp = { index: 0, kind: OpKind.Memory, first: 0, count: 0, r1: 0, r2: 0, r3: 0 };
  private readonly words = new Uint32Array((SEQ_RUN_BLOCKS * GUEST_BLOCK_BYTES) / 4);
  private readonly wordBytes = Buffer.from(this.words.buffer);
  private readonly readBuf = Buffer.alloc(GUEST_BLOCK_BYTES);

  constructor(
    readonly spec: VmSpec,
    readonly memory: Buffer,
    private readonly disk: GuestDisk,
    private readonly hooks: GuestHooks = {},
  ) {
    validateSpec(spec);
    if (memory.length !== spec.memoryBytes) throw new RangeError(`memory is ${memory.length} bytes, spec says ${spec.memoryBytes}`);
    if (memory.byteOffset % 4 !== 0) throw new RangeError('guest memory must be 4-byte aligned');
    this.layout = guestLayout(spec);
    this.table = new Uint32Array(memory.buffer, memory.byteOffset, this.layout.blocks);
    this.vmHash = hashString(spec.vmId);
    this.key = seedKey(spec.vmId, spec.seed);
    this.opsPerSecond = spec.opsPerSecond;
  }

  /** Fresh boot: the version table says what `fill` put on the disk (1) or nothing (0). */
  initMemory(): void {
    this.memory.fill(0);
    if (this.spec.fill) this.table.fill(1);
  }

  blockLength(b: number): number {
    return Math.min(GUEST_BLOCK_BYTES, this.spec.diskBytes - b * GUEST_BLOCK_BYTES);
  }

  /** Plans operation number `this.ops` (does not change any state). */
  plan(): GuestOp {
    const i = this.ops;
    const n = this.layout.blocks;
    const op = this.op;
    op.index = i;
    op.r1 = mixIndex(this.key ^ 0x1b873593, i);
    op.r2 = mixIndex(this.key ^ 0xcc9e2d51, i);
    op.r3 = mixIndex(this.key ^ 0xe6546b64, i);
    op.count = 1;
    op.first = 0;
    switch (this.spec.workload) {
      case 'idle':
      case 'memhog':
        op.kind = OpKind.Memory;
        op.count = 0;
        break;
      case 'seqwrite': {
        const runs = Math.ceil(n / SEQ_RUN_BLOCKS);
        op.kind = OpKind.Write;
        op.first = (i % runs) * SEQ_RUN_BLOCKS;
        op.count = Math.min(SEQ_RUN_BLOCKS, n - op.first);
        break;
      }
      case 'randwrite':
        op.kind = OpKind.Write;
        op.first = op.r2 % n;
        break;
      case 'mixed': {
        const window = Math.min(n, MIXED_WINDOW_BLOCKS);
        const start = Math.floor(i / MIXED_DRIFT_OPS) % n;
        op.kind = op.r1 % 100 < 70 ? OpKind.Read : OpKind.Write;
        op.first = (start + (op.r2 % window)) % n;
        break;
      }
      case 'readmostly': {
        const hot = Math.min(n, HOT_SET_BLOCKS);
        op.kind = op.r1 % 100 < 95 ? OpKind.Read : OpKind.Write;
        op.first = mixIndex(this.key ^ 0x4f1bbcdc, op.r2 % hot) % n;
        break;
      }
    }
    return op;
  }

  /** Executes the operation returned by the last plan() at time `now` (ms). */
  execute(op: GuestOp, now: number): void {
    if (op.index !== this.ops) throw new Error(`op ${op.index} planned but the guest is at ${this.ops}`);
    if (this.lastOpAt !== null) {
      const gap = now - this.lastOpAt;
      if (gap > this.maxGapMs) this.maxGapMs = gap;
      if (this.measureResumeGap) this.resumeGapMs = gap;
    }
    this.measureResumeGap = false;
    if (op.kind === OpKind.Write) {
      this.write(op);
      this.writes++;
    } else if (op.kind === OpKind.Read) {
      this.read(op);
      this.reads++;
    }
    this.stampMemory(op);
    this.lastOpAt = now;
    this.ops++;
  }

  /** Runs `count` operations synchronously (reference runs, benchmarks). */
  runSync(count: number): void {
    for (let k = 0; k < count; k++) this.execute(this.plan(), nowMs());
  }

  private write(op: GuestOp): void {
    const { first, count } = op;
    let bytes = 0;
    for (let k = 0; k < count; k++) {
      const b = first + k;
      fillBlockWords(this.words.subarray(k * 1024, k * 1024 + 1024), this.vmHash, b, (this.table[b] + 1) >>> 0);
      bytes += this.blockLength(b);
    }
    const offset = first * GUEST_BLOCK_BYTES;
    this.hooks.beforeDiskWrite?.(offset, bytes);
    this.disk.write(this.wordBytes, bytes, offset);
    for (let k = 0; k < count; k++) this.table[first + k] = (this.table[first + k] + 1) >>> 0;
    this.hooks.onMemoryWrite?.(first * 4, count * 4);
  }

  private read(op: GuestOp): void {
    const b = op.first;
    const len = this.blockLength(b);
    this.disk.read(this.readBuf, len, b * GUEST_BLOCK_BYTES);
    const expected = this.table[b];
    fillBlockWords(this.words, this.vmHash, b, expected);
    if (this.readBuf.compare(this.wordBytes, 0, len, 0, len) !== 0) {
      this.violations++;
      this.hooks.onViolation?.(b, expected, op.index);
    }
  }

  private stampMemory(op: GuestOp): void {
    const slots = Math.floor(this.layout.dataBytes / MEM_STAMP_BYTES);
    const slot = this.spec.workload === 'idle' ? 0 : op.r3 % slots;
    const at = this.layout.dataOffset + slot * MEM_STAMP_BYTES;
    const m = this.memory;
    m.writeUInt32LE(op.index >>> 0, at);
    m.writeUInt32LE(Math.floor(op.index / 0x1_0000_0000) >>> 0, at + 4);
    m.writeUInt32LE(op.r1, at + 8);
    m.writeUInt32LE(op.r2, at + 12);
    this.hooks.onMemoryWrite?.(at, MEM_STAMP_BYTES);
  }

  saveState(): Buffer {
    const s: GuestCpuState = {
      format: 'ferry-cpu',
      version: 1,
      vmId: this.spec.vmId,
      workload: this.spec.workload,
      seed: this.spec.seed,
      diskBytes: this.spec.diskBytes,
      memoryBytes: this.spec.memoryBytes,
      opsPerSecond: this.opsPerSecond,
      ops: this.ops,
      reads: this.reads,
      writes: this.writes,
      violations: this.violations,
      lastOpAt: this.lastOpAt,
      haltAt: this.haltAt,
    };
    return Buffer.from(JSON.stringify(s));
  }

  /** Throws InvalidArgument if the blob is not a CPU state of this VM. */
  loadState(blob: Buffer): void {
    const s = parseCpuState(blob);
    for (const k of ['vmId', 'workload', 'seed', 'diskBytes', 'memoryBytes'] as const) {
      if (s[k] !== this.spec[k]) {
        throw new HypervisorError(
          'InvalidArgument',
          `CPU state is for ${k}=${JSON.stringify(s[k])} but this VM has ${JSON.stringify(this.spec[k])}: create the destination with the source's spec`,
        );
      }
    }
    this.ops = s.ops;
    this.reads = s.reads ?? 0;
    this.writes = s.writes ?? 0;
    this.violations = s.violations;
    this.lastOpAt = s.lastOpAt;
    this.haltAt = s.haltAt;
    this.opsPerSecond = s.opsPerSecond;
    this.measureResumeGap = s.lastOpAt !== null;
    this.resumeGapMs = null;
  }
}

export function parseCpuState(blob: Buffer): GuestCpuState {
  let s: GuestCpuState;
  try {
    s = JSON.parse(blob.toString('utf8')) as GuestCpuState;
  } catch {
    throw new HypervisorError('InvalidArgument', 'CPU state is not valid: pass the bytes saveState() returned, unchanged');
  }
  const ok =
    s !== null &&
    typeof s === 'object' &&
    s.format === 'ferry-cpu' &&
    s.version === 1 &&
    isInt(s.ops, 0) &&
    isInt(s.violations, 0) &&
    (s.lastOpAt === null || (typeof s.lastOpAt === 'number' && Number.isFinite(s.lastOpAt))) &&
    (s.haltAt === null || isInt(s.haltAt, 0)) &&
    typeof s.opsPerSecond === 'number' &&
    s.opsPerSecond >= 0;
  if (!ok) throw new HypervisorError('InvalidArgument', 'CPU state is not valid: pass the bytes saveState() returned, unchanged');
  return s;
}

/** Writes version 1 of every guest block (spec.fill), yielding between chunks. */
export async function fillDisk(file: fsp.FileHandle, spec: VmSpec): Promise<void> {
  const vmHash = hashString(spec.vmId);
  const blocks = Math.ceil(spec.diskBytes / GUEST_BLOCK_BYTES);
  const chunkBlocks = 256;
  const words = new Uint32Array((chunkBlocks * GUEST_BLOCK_BYTES) / 4);
  const bytes = Buffer.from(words.buffer);
  for (let first = 0; first < blocks; first += chunkBlocks) {
    const count = Math.min(chunkBlocks, blocks - first);
    for (let k = 0; k < count; k++) fillBlockWords(words.subarray(k * 1024, k * 1024 + 1024), vmHash, first + k, 1);
    const offset = first * GUEST_BLOCK_BYTES;
    const len = Math.min(count * GUEST_BLOCK_BYTES, spec.diskBytes - offset);
    let done = 0;
    while (done < len) done += (await file.write(bytes, done, len - done, offset + done)).bytesWritten;
  }
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

export const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

/**
 * The oracle: runs the guest of `spec` in this process, without any migration, for `ops` operations on
 * a temporary image in `dir`, and returns the sha256 (hex) of the final disk and memory.
 */
export async function referenceRun(spec: VmSpec, ops: number, dir: string): Promise<{ disk: string; memory: string }> {
  const ref = await referenceImage(spec, ops, dir);
  try {
    return { disk: await sha256File(ref.file), memory: ref.memory };
  } finally {
    await fsp.rm(ref.file, { force: true });
  }
}

/** The reference run's disk image (left in `dir` for the caller) and the sha256 of its memory. */
export async function referenceImage(spec: VmSpec, ops: number, dir: string): Promise<{ file: string; memory: string }> {
  validateSpec(spec);
  const file = path.join(dir, `${spec.vmId as VmId}.reference-${process.pid}-${Date.now()}.img`);
  const handle = await fsp.open(file, 'w+');
  try {
    await handle.truncate(spec.diskBytes);
    if (spec.fill) await fillDisk(handle, spec);
    const memory = Buffer.alloc(spec.memoryBytes);
    const guest = new Guest(spec, memory, fdDisk(handle.fd));
    guest.initMemory();
    guest.runSync(ops);
    return { file, memory: sha256(memory) };
  } catch (err) {
    await fsp.rm(file, { force: true });
    throw err;
  } finally {
    await handle.close().catch(() => undefined);
  }
}
