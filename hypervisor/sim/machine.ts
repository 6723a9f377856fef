// One simulated VM inside its own process: the guest loop, block-bitmap tracking, the memory dirty
// log, postcopy stale blocks, and the control commands that operate on them.
import * as fs from 'node:fs';
import type { BitmapInfo, VmRunState, VmStatus } from '../driver';
import { BlockSet, DirtyBitmap, bitmapBytes, blockCount, isValidBlockBytes } from '../bitmap';
import * as store from './bitmap-store';
import { GUEST_BLOCK_BYTES } from './content';
import type { CommandHandler, CommandResult } from '../control/server';
import { HypervisorError } from '../errors';
import { Guest, OpKind, fdDisk, nowMs, sha256, sha256File, type GuestOp } from './guest';
import type { JsonObject } from '../control/protocol';
import { IncomingMigration, OutgoingMigration, type OutgoingLimits, type StreamHeader } from './stream';
import { VmPaths, writeFileAtomic, type SavedRun, type VmConfig } from './vm-files';

/** The guest runs ops in a synchronous slice this long, then yields so the control socket stays responsive. */
const SLICE_MS = 1.5;
/** A guest without a rate measures its pace over stretches of running this long... */
const PACE_SAMPLE_MS = 250;
/** ...and keeps this much of the last measure in the next (a moving average). */
const PACE_SMOOTHING = 0.5;
const MAX_LOGGED_VIOLATIONS = 20;
/** While the guest runs, the probe's heartbeat is at most this old (ms). */
const HEARTBEAT_MS = 2;

type LiveState = Exclude<VmRunState, 'stopped' | 'crashed'>;

interface Tracked {
  bitmap: DirtyBitmap;
  persistent: boolean;
  valid: boolean;
  invalidReason?: string;
}

export type Logger = (msg: string, extra?: JsonObject) => void;

function invalid(msg: string): never {
  throw new HypervisorError('InvalidArgument', msg);
}

function intArg(args: JsonObject, name: string, min: number, max = Number.MAX_SAFE_INTEGER, dflt?: number): number {
  const v = args[name] ?? dflt;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    invalid(`argument "${name}" must be an integer from ${min} to ${max}, got ${JSON.stringify(args[name])}`);
  }
  return v as number;
}

function needAttachment(att: Buffer | null, what: string): Buffer {
  if (!att) invalid(`${what} travels as an attachment: put "attachment": <byteLength> in the command line and send the bytes after it`);
  return att as Buffer;
}

export class Machine {
  state: LiveState;
  readonly guest: Guest;
  readonly memory: Buffer;
  private cpuLoaded: boolean;
  private readonly fd: number;
  private readonly bitmaps = new Map<string, Tracked>();
  private tracked: DirtyBitmap[] = [];
  private memLog: DirtyBitmap | null = null;
  private stale: BlockSet | null = null;
  /** Stale blocks for which BLOCK_NEEDED went out and no delivery came yet. */
  private readonly requested = new Set<number>();
  private waitingOn: number[] | null = null;
  private waitingOp = -1;
  private staleWaits = 0;
  private waitStartedAt: number | null = null;
  private longestWaitMs = 0;
  private totalWaitMs = 0;
  /** Disk-write throttle asked for by the orchestrator, and CPU throttle of the stream's auto-converge. */
  private throttle = 0;
  private cpuThrottle = 0;
  private lastHeartbeatMs: number | null = null;
  private maxHeartbeatGapMs = 0;
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private readonly heartbeatWaiters = new Set<{ since: number; resolve: (at: number | null) => void }>();
  private outgoing: OutgoingMigration | null = null;
  /** A stream was loaded and the guest has not run since: stale blocks may still be set. */
  private loadedNotRun = false;
  private incomingStream: IncomingMigration | null = null;
  private scheduled = false;
  private rateBaseAt = 0;
  private rateBaseOps = 0;
  /** A guest without a rate: its pace while unthrottled (ops/s), which a throttle cuts; where its measure began. */
  private freePace: number | null = null;
  private paceMark: { atMs: number; ops: number } | null = null;
  private loggedViolations = 0;
  private stopping = false;

  constructor(
    private readonly paths: VmPaths,
    private config: VmConfig,
    opts: { startPaused: boolean },
    private readonly log: Logger,
    private readonly emit: (event: string, data: JsonObject) => void,
    /** The process gives up (a failed incoming stream, as QEMU's destination does). */
    private readonly exit: (code: number, reason: string) => void = () => undefined,
  ) {
    const spec = config.spec;
    this.fd = fs.openSync(paths.disk, 'r+');
    const size = fs.fstatSync(this.fd).size;
    if (size !== spec.diskBytes) {
      throw new Error(`disk.img is ${size} bytes but vm.json says ${spec.diskBytes}: the image was changed outside Ferry`);
    }
    this.memory = Buffer.alloc(spec.memoryBytes);
    this.guest = new Guest(spec, this.memory, fdDisk(this.fd), {
      beforeDiskWrite: (offset, length) => {
        for (const b of this.tracked) b.markWrite(offset, length);
      },
      onMemoryWrite: (offset, length) => this.memLog?.markWrite(offset, length),
      onViolation: (block, expected, op) => {
        if (this.loggedViolations++ < MAX_LOGGED_VIOLATIONS) {
          this.log('read check failed: stale or corrupt block', { block, expectedVersion: expected, op });
        }
      },
    });

    let incoming = config.incoming;
    const saved = this.takeSavedRun();
    if (saved) {
      incoming = saved.incoming;
      this.cpuLoaded = saved.cpu !== null;
      if (saved.cpu !== null) this.guest.loadState(Buffer.from(saved.cpu, 'base64'));
      if (saved.stale) this.stale = new BlockSet(spec.diskBytes, saved.stale.blockBytes, Buffer.from(saved.stale.bits, 'base64'));
      this.log('resumed from a clean stop', { ops: this.guest.ops, incoming });
    } else if (incoming) {
      this.cpuLoaded = false;
    } else {
      this.guest.initMemory();
      this.cpuLoaded = true;
    }
    this.loadPersistentBitmaps();
    this.state = incoming ? 'incoming' : opts.startPaused ? 'paused' : 'running';
    if (this.state === 'running') this.startRunning();
  }

  /** memory.bin + saved.json from a clean stop; consumed so that a later crash boots afresh. */
  private takeSavedRun(): SavedRun | null {
    let saved: SavedRun;
    try {
      saved = JSON.parse(fs.readFileSync(this.paths.saved, 'utf8')) as SavedRun;
      const fd = fs.openSync(this.paths.memory, 'r');
      try {
        let done = 0;
        while (done < this.memory.length) {
          const n = fs.readSync(fd, this.memory, done, this.memory.length - done, done);
          if (n === 0) throw new Error('memory.bin is shorter than the memory');
          done += n;
        }
      } finally {
        fs.closeSync(fd);
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') this.log('ignoring the saved run', { error: String(e) });
      return null;
    } finally {
      fs.rmSync(this.paths.saved, { force: true });
      fs.rmSync(this.paths.memory, { force: true });
    }
    return saved;
  }

  private loadPersistentBitmaps(): void {
    const size = this.config.spec.diskBytes;
    for (const rec of store.loadAll(this.paths.bitmaps, size)) {
      const blockBytes = rec.blockBytes !== null && isValidBlockBytes(rec.blockBytes) ? rec.blockBytes : 64 * 1024;
      const bitmap = new DirtyBitmap(size, blockBytes);
      if (rec.valid) {
        bitmap.load(rec.bits);
        this.bitmaps.set(rec.name, { bitmap, persistent: true, valid: true });
      } else {
        // Never silently empty: every block counts as dirty until a snapshot of it is acknowledged.
        bitmap.markAll();
        this.bitmaps.set(rec.name, { bitmap, persistent: true, valid: false, invalidReason: rec.reason });
        this.log('persistent bitmap is invalid', { name: rec.name, reason: rec.reason });
      }
      store.writeInUse(this.paths.bitmaps, rec.name, blockBytes, size);
    }
    this.refreshTracked();
  }

  private refreshTracked(): void {
    this.tracked = [...this.bitmaps.values()].map((t) => t.bitmap);
  }

  // ---- the guest loop ----

  private startRunning(): void {
    this.loadedNotRun = false;
    this.setState('running');
    this.rebaseRate();
    this.schedule(0);
  }

  /** Every change of run state goes through here: the heartbeat runs exactly while the guest does. */
  private setState(next: LiveState): void {
    if (this.state === 'running' && next !== 'running') this.beat(); // the guest ran until this instant
    this.state = next;
    if (next === 'running' && this.heartbeatTimer === null) {
      this.heartbeatTimer = setInterval(() => this.beat(), HEARTBEAT_MS);
    } else if (next !== 'running' && this.heartbeatTimer !== null) {
      clearInterval(this.heartbeatTimer);
      this.heartbeatTimer = null;
    }
  }

  /** The guest probe's heartbeat: the guest is alive at this instant (host clock). */
  private beat(): void {
    const now = nowMs();
    if (this.lastHeartbeatMs !== null) this.maxHeartbeatGapMs = Math.max(this.maxHeartbeatGapMs, now - this.lastHeartbeatMs);
    this.lastHeartbeatMs = now;
    for (const w of this.heartbeatWaiters) {
      if (now >= w.since) {
        this.heartbeatWaiters.delete(w);
        w.resolve(now);
      }
    }
  }

  private effectiveThrottle(): number {
    return 1 - (1 - this.throttle) * (1 - this.cpuThrottle);
  }

  private rebaseRate(): void {
    this.rateBaseAt = nowMs();
    this.rateBaseOps = this.guest.ops;
    this.paceMark = null; // a pause or a throttle change is not part of the pace
  }

  private schedule(delayMs: number): void {
    if (this.scheduled || this.stopping) return;
    this.scheduled = true;
    if (delayMs < 1) setImmediate(() => this.tick());
    else setTimeout(() => this.tick(), delayMs);
  }

  private tick(): void {
    this.scheduled = false;
    if (this.state !== 'running' || this.stopping) return;
    const guest = this.guest;
    const start = nowMs();
    this.beat();
    let budget = Number.POSITIVE_INFINITY;
    // Throttles (the disk's and the stream's auto-converge): the guest keeps (1 - throttle) of its rate,
    // or, without one, of the pace it had unthrottled (until that is measured it runs free).
    const throttle = this.effectiveThrottle();
    const measuring = guest.opsPerSecond === 0 && (throttle === 0 || this.freePace === null);
    const rate = measuring ? 0 : (guest.opsPerSecond || (this.freePace as number)) * (1 - throttle);
    if (rate > 0) {
      const due = this.rateBaseOps + Math.floor(((start - this.rateBaseAt) * rate) / 1000);
      if (due - guest.ops > Math.max(1, rate * 0.2)) {
        this.rebaseRate(); // after a stall, do not catch up in a burst
        budget = 1;
      } else {
        budget = due - guest.ops;
      }
      if (budget <= 0) {
        const nextAt = this.rateBaseAt + ((guest.ops + 1 - this.rateBaseOps) * 1000) / rate;
        this.schedule(Math.max(1, nextAt - start));
        return;
      }
    }
    let now = start;
    for (let done = 0; done < budget; done++) {
      if (guest.haltAt !== null && guest.ops >= guest.haltAt) {
        this.halt();
        return;
      }
      const op = guest.plan();
      if (this.stale !== null && this.stale.size > 0 && this.blockedByStale(op)) return; // a delivery reschedules
      guest.execute(op, now);
      now = nowMs();
      if (now - start >= SLICE_MS) break;
    }
    if (measuring) this.measurePace(now);
    this.schedule(0);
  }

  private measurePace(now: number): void {
    const mark = this.paceMark;
    if (!mark) {
      this.paceMark = { atMs: now, ops: this.guest.ops };
    } else if (now - mark.atMs >= PACE_SAMPLE_MS) {
      const pace = ((this.guest.ops - mark.ops) * 1000) / (now - mark.atMs);
      this.freePace = this.freePace === null ? pace : PACE_SMOOTHING * this.freePace + (1 - PACE_SMOOTHING) * pace;
      this.paceMark = { atMs: now, ops: this.guest.ops };
    }
  }

  /** haltAt stays set: it is part of the CPU state, so a halted guest stays halted wherever it moves. */
  private halt(): void {
    this.setState('halted');
    this.emit('HALTED', { ops: this.guest.ops });
  }

  /**
   * Postcopy interception. A read of a stale block, or a partial write to one, stalls the guest until
   * the block is delivered (BLOCK_NEEDED once per block). A write covering a whole stale block makes
   * it fresh: its later delivery is discarded.
   */
  private blockedByStale(op: GuestOp): boolean {
    const stale = this.stale as BlockSet;
    const bb = stale.blockBytes;
    const disk = this.config.spec.diskBytes;
    let need: number[] | null = null;
    if (op.kind === OpKind.Read) {
      const t = Math.floor((op.first * GUEST_BLOCK_BYTES) / bb);
      if (stale.has(t)) need = [t];
    } else if (op.kind === OpKind.Write) {
      const from = op.first * GUEST_BLOCK_BYTES;
      const to = Math.min(disk, (op.first + op.count) * GUEST_BLOCK_BYTES);
      const whole: number[] = [];
      for (let t = Math.floor(from / bb); t <= Math.floor((to - 1) / bb); t++) {
        if (!stale.has(t)) continue;
        const tFrom = t * bb;
        const tTo = Math.min(disk, tFrom + bb);
        if (from <= tFrom && to >= tTo) whole.push(t);
        else (need ??= []).push(t);
      }
      if (!need) {
        for (const t of whole) {
          stale.delete(t);
          this.requested.delete(t);
        }
      }
    }
    if (!need) return false;
    this.waitingOn = need;
    if (this.waitingOp !== op.index) {
      this.waitingOp = op.index;
      this.staleWaits++;
      this.waitStartedAt = nowMs();
    }
    for (const t of need) {
      if (this.requested.has(t)) continue;
      this.requested.add(t);
      this.emit('BLOCK_NEEDED', { block: t });
    }
    return true;
  }

  private wakeIfDelivered(): void {
    if (this.waitingOn && this.waitingOn.every((t) => !this.stale?.has(t))) {
      this.waitingOn = null;
      if (this.waitStartedAt !== null) {
        const waited = nowMs() - this.waitStartedAt;
        this.waitStartedAt = null;
        this.longestWaitMs = Math.max(this.longestWaitMs, waited);
        this.totalWaitMs += waited;
      }
      if (this.state === 'running') this.schedule(0);
    }
  }

  // ---- the machine-state stream ----

  private streamHeader(): StreamHeader {
    const { vmId, memoryBytes, diskBytes } = this.config.spec;
    return { format: 'ferry-sim-stream', version: 1, vmId, memoryBytes, diskBytes };
  }

  private streamMachine() {
    return {
      memory: this.memory,
      header: () => this.streamHeader(),
      setMemoryLog: (log: DirtyBitmap | null) => void (this.memLog = log),
      pauseForSwitchover: () => {
        const wasRunning = this.state === 'running';
        if (wasRunning) this.setState('paused');
        return wasRunning;
      },
      resumeAfterFailure: (wasRunning: boolean) => {
        if (wasRunning && this.state === 'paused') this.startRunning();
      },
      migrated: () => this.setState('migrated'),
      cpuState: () => this.guest.saveState(),
      setCpuThrottle: (fraction: number) => {
        this.cpuThrottle = fraction;
        this.rebaseRate();
      },
      emit: this.emit,
    };
  }

  private incomingMachine() {
    return {
      memory: this.memory,
      header: () => this.streamHeader(),
      loadCpuState: (state: Buffer) => {
        this.guest.loadState(state);
        this.waitingOn = null;
      },
      loaded: () => {
        // As QEMU's destination after `-incoming`: a guest, paused until it is resumed.
        this.cpuLoaded = true;
        this.config = { ...this.config, incoming: false };
        writeFileAtomic(this.paths.config, JSON.stringify(this.config, null, 2));
        this.setState('paused');
        this.loadedNotRun = true;
      },
      fail: (reason: string) => {
        this.log(reason);
        this.exit(1, reason);
      },
      emit: this.emit,
    };
  }

  // ---- status ----

  status(): VmStatus & JsonObject {
    const spec = this.config.spec;
    const g = this.guest;
    return {
      vmId: spec.vmId,
      state: this.state,
      pid: process.pid,
      diskBytes: spec.diskBytes,
      memoryBytes: spec.memoryBytes,
      workload: spec.workload,
      seed: spec.seed,
      opsPerSecond: g.opsPerSecond,
      fill: spec.fill === true,
      throttle: this.throttle,
      accel: 'sim',
      guest: this.cpuLoaded
        ? { ops: g.ops, reads: g.reads, writes: g.writes, violations: g.violations, lastHeartbeatMs: this.lastHeartbeatMs, maxGapMs: this.maxHeartbeatGapMs }
        : null,
      staleBlocks: this.stale?.size ?? 0,
      cpuLoaded: this.cpuLoaded,
      waitingFor: this.waitingOn ?? [],
      migration: this.outgoing?.progress() ?? this.incomingStream?.progress() ?? null,
    };
  }

  private bitmapInfo(name: string, t: Tracked): BitmapInfo & JsonObject {
    return {
      name,
      blockBytes: t.bitmap.blockBytes,
      persistent: t.persistent,
      valid: t.valid,
      dirtyCount: t.bitmap.dirtyCount,
      pendingCount: t.bitmap.pendingCount,
      ...(t.invalidReason ? { invalidReason: t.invalidReason } : {}),
    };
  }

  private requireState(command: string, allowed: LiveState[], fix: string): void {
    if (!allowed.includes(this.state)) {
      throw new HypervisorError('InvalidState', `${command} is not allowed while the VM is ${this.state}: ${fix}`);
    }
  }

  private bitmap(name: unknown): Tracked {
    if (typeof name !== 'string') invalid('argument "name" must be the bitmap name (a string)');
    const t = this.bitmaps.get(name as string);
    if (!t) throw new HypervisorError('BitmapNotFound', `no bitmap ${JSON.stringify(name)}: add it with bitmap-add first`);
    return t;
  }

  // ---- clean stop ----

  /** Saves everything a restart needs; persistent bitmaps are marked clean last, after the data is safe. */
  shutdownClean(): void {
    this.stopping = true;
    fs.fdatasyncSync(this.fd);
    const saved: SavedRun = {
      incoming: this.state === 'incoming',
      cpu: this.cpuLoaded ? this.guest.saveState().toString('base64') : null,
      stale: this.stale && this.stale.size > 0 ? { blockBytes: this.stale.blockBytes, bits: Buffer.from(this.stale.bits).toString('base64') } : null,
      stoppedAt: new Date().toISOString(),
    };
    writeFileAtomic(this.paths.memory, this.memory);
    writeFileAtomic(this.paths.saved, JSON.stringify(saved));
    for (const [name, t] of this.bitmaps) {
      if (!t.persistent) continue;
      if (t.valid) store.writeClean(this.paths.bitmaps, name, t.bitmap.blockBytes, this.config.spec.diskBytes, t.bitmap.allBits());
      // an invalid bitmap stays "in-use" on disk: it is loaded invalid again
    }
    fs.closeSync(this.fd);
  }

  // ---- commands ----

  commands(onQuit: () => void): Map<string, CommandHandler> {
    const c = new Map<string, CommandHandler>();
    const spec = this.config.spec;
    const disk = spec.diskBytes;

    c.set('query-commands', () => ({ ret: { commands: [...c.keys()].sort() } }));
    c.set('query-status', () => ({ ret: this.status() }));

    c.set('pause', () => {
      if (this.state === 'incoming' && this.cpuLoaded) {
        // A loaded incoming VM that stays paused (a cold migration): it is this host's VM from now on.
        this.config = { ...this.config, incoming: false };
        writeFileAtomic(this.paths.config, JSON.stringify(this.config, null, 2));
      } else {
        this.requireState('pause', ['running', 'paused', 'halted'], 'an incoming VM has no guest to pause before its machine-state stream is loaded');
      }
      this.setState('paused');
      return { ret: { ops: this.guest.ops } };
    });

    c.set('resume', () => {
      if (this.state === 'running') return { ret: { ops: this.guest.ops } };
      if (this.outgoing?.active) {
        throw new HypervisorError('InvalidState', `a migration stream is ${this.outgoing.status}: cancel it (migrate-cancel) before resuming here`);
      }
      if (this.state === 'incoming') {
        throw new HypervisorError('InvalidState', 'an incoming VM runs only once its machine-state stream is loaded (migrate-incoming)');
      }
      if (this.state === 'halted') {
        this.guest.haltAt = null; // an explicit resume of a halted guest runs it on
      } else if (this.guest.haltAt !== null && this.guest.ops >= this.guest.haltAt) {
        this.halt(); // a guest that halted before it migrated stays halted
        return { ret: { ops: this.guest.ops, state: this.state } };
      }
      this.startRunning();
      return { ret: { ops: this.guest.ops } };
    });

    c.set('run-until', (args) => {
      this.requireState('run-until', ['running', 'paused', 'halted'], 'resume an incoming VM first');
      const target = intArg(args, 'ops', 0);
      if (target < this.guest.ops) {
        invalid(`the guest is already at ${this.guest.ops} operations: pick a target >= ${this.guest.ops}`);
      }
      this.guest.haltAt = target;
      if (target === this.guest.ops) this.halt();
      else if (this.state !== 'running') this.startRunning();
      return { ret: { ops: this.guest.ops, target, state: this.state } };
    });

    c.set('set-throttle', (args) => {
      const f = args.fraction;
      if (typeof f !== 'number' || !(f >= 0 && f < 1)) invalid('argument "fraction" must be a number in [0, 1)');
      this.throttle = f as number;
      this.rebaseRate();
      return { ret: { throttle: this.throttle } };
    });

    c.set('wait-heartbeat', (args) => {
      const since = args.since;
      if (typeof since !== 'number' || !Number.isFinite(since)) invalid('argument "since" must be a time in ms since the epoch');
      const timeoutMs = intArg(args, 'timeoutMs', 0, 600_000);
      if (this.lastHeartbeatMs !== null && this.lastHeartbeatMs >= (since as number)) return { ret: { at: this.lastHeartbeatMs } };
      return new Promise<CommandResult>((resolve) => {
        const waiter = { since: since as number, resolve: (at: number | null) => resolve({ ret: { at } }) };
        this.heartbeatWaiters.add(waiter);
        setTimeout(() => {
          if (this.heartbeatWaiters.delete(waiter)) waiter.resolve(null);
        }, timeoutMs);
      });
    });

    const limits = (args: JsonObject): Partial<OutgoingLimits> => {
      const out: Partial<OutgoingLimits> = {};
      if (args.downtimeLimitMs !== undefined) out.downtimeLimitMs = intArg(args, 'downtimeLimitMs', 0, 3_600_000);
      if (args.bandwidthBytesPerSecond !== undefined) {
        const bw = args.bandwidthBytesPerSecond;
        if (bw !== null && !(typeof bw === 'number' && bw > 0 && Number.isFinite(bw))) invalid('argument "bandwidthBytesPerSecond" must be a positive number or null');
        out.bandwidthBytesPerSecond = bw as number | null;
      }
      if (args.autoConverge !== undefined) {
        if (typeof args.autoConverge !== 'boolean') invalid('argument "autoConverge" must be a boolean');
        out.autoConverge = args.autoConverge as boolean;
      }
      return out;
    };
    const socketPath = (args: JsonObject): string => {
      if (typeof args.uri !== 'string' || !args.uri.startsWith('unix:')) invalid('argument "uri" must be unix:<socket path>');
      return (args.uri as string).slice('unix:'.length);
    };
    const outgoing = (): OutgoingMigration => {
      if (!this.outgoing) throw new HypervisorError('InvalidState', 'no outgoing migration: start one with migrate');
      return this.outgoing;
    };

    c.set('migrate', (args) => {
      this.requireState('migrate', ['running', 'paused', 'halted'], 'only a VM with a guest can migrate out');
      if (this.outgoing?.active) throw new HypervisorError('InvalidState', `a migration stream is already ${this.outgoing.status}: cancel it first`);
      if (this.stale && this.stale.size > 0) {
        // Its disk still has holes only the previous source can fill: it cannot move on yet.
        throw new HypervisorError('InvalidState', `${this.stale.size} blocks are still stale: finish the postcopy (deliver-blocks) first`);
      }
      const path = socketPath(args);
      this.outgoing = new OutgoingMigration(this.streamMachine(), { downtimeLimitMs: 300, bandwidthBytesPerSecond: null, autoConverge: false, ...limits(args) });
      this.outgoing.start(path);
      return { ret: {} };
    });
    c.set('migrate-set-parameters', (args) => {
      outgoing().setLimits(limits(args));
      return { ret: {} };
    });
    c.set('migrate-continue', () => {
      try {
        outgoing().continue();
      } catch (err) {
        throw new HypervisorError('InvalidState', (err as Error).message);
      }
      return { ret: {} };
    });
    c.set('migrate-cancel', () => {
      if (this.outgoing?.active) this.outgoing.cancel();
      return { ret: {} };
    });
    c.set('query-migrate', () => ({ ret: this.outgoing?.progress() ?? this.incomingStream?.progress() ?? { status: 'none' } }));

    c.set('migrate-incoming', async (args) => {
      this.requireState('migrate-incoming', ['incoming'], 'only an incoming VM loads a machine-state stream');
      if (this.incomingStream) throw new HypervisorError('InvalidState', `this incoming VM already took a stream (${this.incomingStream.status}): start a fresh process`);
      const path = socketPath(args);
      this.incomingStream = new IncomingMigration(this.incomingMachine());
      await this.incomingStream.listen(path);
      return { ret: {} };
    });

    c.set('bitmap-add', (args) => {
      const name = args.name;
      if (typeof name !== 'string' || !store.BITMAP_NAME.test(name)) {
        invalid(`argument "name" ${JSON.stringify(name)}: use 1-63 characters of A-Z, a-z, 0-9, '.', '_' or '-'`);
      }
      const blockBytes = args.blockBytes ?? 64 * 1024;
      if (!isValidBlockBytes(blockBytes)) invalid('argument "blockBytes" must be a power of two from 4096 to 1048576');
      const persistent = args.persistent ?? false;
      if (typeof persistent !== 'boolean') invalid('argument "persistent" must be a boolean');
      const existing = this.bitmaps.get(name as string);
      if (existing) {
        if (existing.bitmap.blockBytes === blockBytes && existing.persistent === persistent) return { ret: { existed: true } };
        throw new HypervisorError('BitmapExists', `bitmap ${name} exists with other settings: remove it first or pick another name`);
      }
      if (persistent) store.writeInUse(this.paths.bitmaps, name as string, blockBytes as number, disk);
      this.bitmaps.set(name as string, { bitmap: new DirtyBitmap(disk, blockBytes as number), persistent: persistent as boolean, valid: true });
      this.refreshTracked();
      return { ret: { existed: false } };
    });

    c.set('bitmap-remove', (args) => {
      const name = args.name;
      if (typeof name !== 'string') invalid('argument "name" must be the bitmap name (a string)');
      const t = this.bitmaps.get(name as string);
      if (!t) return { ret: { removed: false } };
      this.bitmaps.delete(name as string);
      this.refreshTracked();
      if (t.persistent) store.removeStored(this.paths.bitmaps, name as string);
      return { ret: { removed: true } };
    });

    c.set('bitmap-list', () => ({ ret: { bitmaps: [...this.bitmaps].map(([n, t]) => this.bitmapInfo(n, t)) } }));

    c.set('bitmap-snapshot', (args) => {
      const t = this.bitmap(args.name);
      const snap = t.bitmap.snapshot();
      return { ret: { generation: snap.generation, blockBytes: snap.blockBytes, count: snap.count, valid: t.valid }, attachment: snap.bits };
    });

    c.set('bitmap-ack', (args) => {
      const t = this.bitmap(args.name);
      const acked = t.bitmap.ack(intArg(args, 'generation', 1));
      if (acked && !t.valid) {
        // The acknowledged snapshot held every block; from here on the bitmap has seen every write.
        t.valid = true;
        delete t.invalidReason;
      }
      return { ret: { acked } };
    });

    c.set('set-stale', (args, att) => {
      if (!(this.state === 'incoming' || (this.state === 'paused' && this.loadedNotRun))) {
        throw new HypervisorError('InvalidState', `set-stale is not allowed while the VM is ${this.state}: stale blocks can only be set on an incoming VM, before it resumes`);
      }
      const blockBytes = args.blockBytes;
      if (!isValidBlockBytes(blockBytes)) invalid('argument "blockBytes" must be a power of two from 4096 to 1048576');
      const bits = needAttachment(att, 'the stale bitmap');
      const expected = bitmapBytes(blockCount(disk, blockBytes as number));
      if (bits.length !== expected) invalid(`the stale bitmap must be ${expected} bytes for this disk at ${blockBytes}-byte blocks, got ${bits.length}`);
      if (this.stale && this.stale.blockBytes !== blockBytes) {
        invalid(`stale blocks were already set at ${this.stale.blockBytes}-byte blocks: use the same block size`);
      }
      if (this.stale) this.stale.unionWith(bits);
      else this.stale = new BlockSet(disk, blockBytes as number, bits);
      return { ret: { staleBlocks: this.stale.size } };
    });

    c.set('deliver-blocks', (args, att) => {
      const blockBytes = args.blockBytes;
      if (!isValidBlockBytes(blockBytes)) invalid('argument "blockBytes" must be a power of two from 4096 to 1048576');
      const items = args.items;
      if (!Array.isArray(items)) invalid('argument "items" must be an array of {"block": n, "length": bytes}');
      const data = needAttachment(att, 'block data');
      const blocks = blockCount(disk, blockBytes as number);
      let total = 0;
      for (const it of items as JsonObject[]) {
        const ok = it !== null && typeof it === 'object';
        const block = ok ? intArg(it, 'block', 0, blocks - 1) : invalid('each item must be {"block": n, "length": bytes}');
        const want = Math.min(blockBytes as number, disk - block * (blockBytes as number));
        if (it.length !== want) invalid(`block ${block} is ${want} bytes long, item says ${JSON.stringify(it.length)}`);
        total += want;
      }
      if (total !== data.length) invalid(`items add up to ${total} bytes but the attachment has ${data.length}`);
      if (this.stale && this.stale.blockBytes !== blockBytes) {
        invalid(`stale blocks are ${this.stale.blockBytes} bytes: deliver at that block size`);
      }
      let applied = 0;
      let at = 0;
      const io = fdDisk(this.fd);
      for (const it of items as { block: number; length: number }[]) {
        if (this.stale?.has(it.block)) {
          io.write(data.subarray(at, at + it.length), it.length, it.block * (blockBytes as number));
          this.stale.delete(it.block);
          this.requested.delete(it.block);
          applied++;
        }
        at += it.length;
      }
      this.wakeIfDelivered();
      return { ret: { applied, discarded: (items as unknown[]).length - applied, staleBlocks: this.stale?.size ?? 0 } };
    });

    c.set('query-stale', () => ({
      ret: {
        blockBytes: this.stale?.blockBytes ?? null,
        count: this.stale?.size ?? 0,
        blocks: this.stale?.list() ?? [],
        waiting: [...this.requested],
        waits: this.staleWaits,
        longestWaitMs: Math.round(this.longestWaitMs * 10) / 10,
        totalWaitMs: Math.round(this.totalWaitMs * 10) / 10,
      },
    }));

    c.set('end-postcopy', () => {
      if (this.stale && this.stale.size > 0) throw new HypervisorError('InvalidState', `${this.stale.size} blocks are still stale: deliver them first`);
      this.stale = null;
      return { ret: {} };
    });

    c.set('hashes', async (): Promise<CommandResult> => {
      this.requireState('hashes', ['paused', 'halted', 'incoming', 'migrated'], 'pause the VM (or run-until) first, so disk and memory hold still');
      const memory = sha256(this.memory);
      const diskHash = await sha256File(this.paths.disk);
      return { ret: { disk: diskHash, memory, ops: this.guest.ops } };
    });

    c.set('quit', () => {
      setImmediate(onQuit);
      return { ret: {} };
    });
    return c;
  }
}
