// The destination role: an incoming VM shell that the source fills over the data plane, the
// commit point, and the postcopy service (stale blocks, on-demand fetches).
import path from 'node:path';
import { promises as fs } from 'node:fs';
import type { DiskAccess, HypervisorDriver, IncomingStream, StaleWaitStats, VmHandle, VmSpec } from '../hypervisor/driver';
import type { Message, ServerSession, SessionHandler, SessionIdentity } from '../dataplane/api';
import { DataPlaneError } from '../dataplane/api';
import { readJsonIfExists, writeFileDurable } from '../common/durable-file';
import { vmId as asVmId } from '../common/types';
import { BlockSet } from '../hypervisor/bitmap';
import { OwnershipStore } from './ownership';
import { BaseStore, IM_BITMAP, ImStore } from './bases';
import { MIGRATION_PROTOCOL, Msg, indicesToBitmap, type QueryReply } from './messages';
import type { Logger } from '../common/log';
import { faultPoint } from '../common/fault-points';

export class InsufficientSpace extends Error {}

export class IncrementalUnavailable extends Error {}

export interface IncrementalRequest {
  policy: 'auto' | 'off' | 'require';
  /** Lineage of the source's write-tracking bitmap, or null when it has none. */
  lineage: string | null;
  bitmapValid: boolean;
  blockBytes: number;
}

export type IncrementalDecision = { incremental: true; reason?: undefined } | { incremental: false; reason: string };

export interface IncomingRecord {
  migrationId: string;
  vmId: string;
  epoch: number;
  sourceHost: string;
  blockBytes: number;
  spec: VmSpec;
  incremental: IncrementalDecision;
  /** What the destination measured, kept with the record so an agent restart loses none of it. */
  measured?: Measured;
}

/** Facts only the destination can see, for the report (DESIGN: measure what the guest saw). */
export interface Measured {
  /** Host clock when the commit was recorded (ms since the epoch). */
  committedAtMs?: number;
  /** The guest's last heartbeat on the source, as the Final message carried it. */
  sourceHeartbeatMs?: number | null;
  /** First heartbeat after the resume here minus the last one on the source (ms). */
  downtimeMs?: number | null;
  /** Stale blocks at the commit. */
  staleAtCommit?: number;
  /** When the last stale block arrived (ms since the epoch). */
  postcopyDoneAtMs?: number;
  /** Whether the guest ran on the source before the freeze (a paused VM stays paused). */
  guestRunning?: boolean;
}

interface Final {
  bits: Buffer;
  count: number;
  lastHeartbeatMs: number | null;
  guestRunning: boolean;
}

interface Incoming {
  record: IncomingRecord;
  vm: VmHandle | null;
  disk: DiskAccess | null;
  postcopy: ServerSession | null;
  /** Blocks the guest waits for that have not yet been asked of the source. */
  needed: Set<number>;
  fetches: number;
  unsubscribe: (() => void) | null;
  /** The machine-state stream being loaded, and the next chunk it expects. */
  stream: { id: string; nextSeq: number; sink: IncomingStream } | null;
  /** The VM process was started by this agent for this migration and took no stream yet. */
  fresh: boolean;
  final: Final | null;
  /** The downtime measurement after the resume (finish waits for it). */
  measuring: Promise<void> | null;
}

/** How long Commit waits for the hypervisor to finish loading a stream whose last byte it has. */
const STREAM_LOAD_TIMEOUT_MS = 60_000;
/** How long after the resume the first guest heartbeat may take (the downtime measure). */
const HEARTBEAT_TIMEOUT_MS = 30_000;

export class Destination {
  private readonly incoming = new Map<string, Incoming>();
  private readonly dir: string;
  private readonly bases: BaseStore;
  private readonly ims: ImStore;

  constructor(
    private readonly deps: { host: string; driver: HypervisorDriver; ownership: OwnershipStore; home: string; log: Logger },
  ) {
    this.dir = path.join(deps.home, 'incoming');
    this.bases = new BaseStore(deps.home);
    this.ims = new ImStore(deps.home);
  }

  /**
   * Create (or find again, on a retry) the incoming shell for a migration. Idempotent. With an
   * incremental request, builds on this host's base of the VM when its lineage and sizes match and it is intact
   * allow it; otherwise starts from an empty image and says why.
   */
  async prepare(request: Omit<IncomingRecord, 'incremental'>, im: IncrementalRequest): Promise<IncrementalDecision> {
    const existing = await readJsonIfExists<IncomingRecord>(this.recordFile(request.migrationId));
    const id = asVmId(request.vmId);
    let decision: IncrementalDecision;
    if (existing) {
      decision = existing.incremental;
    } else {
      await this.checkSpace(request);
      decision = await this.decideIncremental(request, im);
      if (!decision.incremental && im.policy === 'require') throw new IncrementalUnavailable(`incremental migration required but not possible: ${decision.reason}`);
      await this.deps.ownership.recordIncoming(request.vmId, request.epoch, request.migrationId);
      if (decision.incremental) {
        await this.bases.put({ ...(await this.bases.get(request.vmId))!, inUseBy: request.migrationId });
      } else {
        await this.bases.remove(request.vmId);
        await fs.rm(this.deps.driver.diskPath(id), { force: true });
      }
      await writeFileDurable(this.recordFile(request.migrationId), JSON.stringify({ ...request, incremental: decision }, null, 2));
    }
    if (!(await this.deps.driver.exists(id))) {
      await this.deps.driver.create(request.spec, { incoming: true, reuseDisk: decision.incremental });
    }
    const status = await this.deps.driver.inspect(id);
    let started = false;
    if (status.state === 'stopped' || status.state === 'crashed') {
      (await this.deps.driver.start(id)).close();
      started = true;
    }
    const inc = await this.open(request.migrationId);
    inc.fresh ||= started;
    await this.ims.put({ vmId: request.vmId, lineage: request.migrationId, diskBytes: request.spec.diskBytes, blockBytes: request.blockBytes, startedAt: new Date().toISOString() });
    return decision;
  }

  private async decideIncremental(request: Omit<IncomingRecord, 'incremental'>, im: IncrementalRequest): Promise<IncrementalDecision> {
    const full = (reason: string): IncrementalDecision => ({ incremental: false, reason });
    if (im.policy === 'off') return full('incremental migration turned off for this migration');
    if (!im.lineage) return full(`the source has no write-tracking bitmap for VM ${request.vmId} (its first migration from there)`);
    if (!im.bitmapValid) return full('the source\'s write-tracking bitmap is invalid after an unclean stop of the VM: it may miss writes');
    const base = await this.bases.get(request.vmId);
    if (!base) return full(`this host holds no base of VM ${request.vmId}`);
    if (base.lineage !== im.lineage) return full(`lineage mismatch: the base here comes from migration ${base.lineage}, the source's bitmap from ${im.lineage}`);
    if (base.diskBytes !== request.spec.diskBytes) return full(`the disk size changed from ${base.diskBytes} to ${request.spec.diskBytes} bytes`);
    if (base.blockBytes !== request.blockBytes || im.blockBytes !== request.blockBytes) {
      return full(`the block size changed (base ${base.blockBytes}, bitmap ${im.blockBytes}, migration ${request.blockBytes})`);
    }
    if (!(await this.bases.intact(base, this.deps.driver.diskPath(asVmId(request.vmId))))) {
      return full('the base image digest does not match: the base was changed or damaged since it was kept');
    }
    return { incremental: true };
  }

  private async checkSpace(record: Omit<IncomingRecord, 'incremental'>): Promise<void> {
    const id = asVmId(record.vmId);
    if (await this.deps.driver.exists(id)) return; // a retry: the image is already there
    await fs.mkdir(this.deps.home, { recursive: true });
    const st = await fs.statfs(this.deps.home);
    const free = st.bavail * st.bsize;
    const need = record.spec.diskBytes + record.spec.memoryBytes;
    if (free < need) {
      throw new InsufficientSpace(
        `destination ${this.deps.home} has ${free} bytes free but VM ${record.vmId} needs ${need} (disk + memory): free space there or choose another destination`,
      );
    }
  }

  /**
   * Fence the epoch (never resumed here) and remove the shell. Refused after the commit. On a full
   * filesystem the fence cannot be written until the shell's files are gone: they go first then (a
   * full filesystem cannot record a commit either, so the epoch was not running).
   */
  async abort(migrationId: string, vmId: string, epoch: number): Promise<void> {
    try {
      await this.deps.ownership.abortIncoming(vmId, epoch, migrationId);
    } catch (err) {
      if (!isOutOfSpace(err)) throw err;
      this.deps.log.warn({ migrationId, err: String(err) }, 'no space left to record the fence: removing the incoming VM first to make room');
      await this.removeShell(migrationId);
      await this.deps.ownership.abortIncoming(vmId, epoch, migrationId);
    }
    await this.removeShell(migrationId);
  }

  /**
   * The operator declared this host lost while it held the migration (ferry resolve
   * --destination-lost) and the VM runs on its source again: destroy the copy here, committed or
   * not, and record that this host never runs the epoch. Returns false when this host holds a
   * newer epoch or another migration's copy of the VM (left alone).
   */
  async revoke(migrationId: string, vmId: string, epoch: number): Promise<boolean> {
    const own = await this.deps.ownership.get(vmId);
    const recorded = (await readJsonIfExists<IncomingRecord>(this.recordFile(migrationId))) !== null;
    if (own && (own.migrationId !== migrationId || own.epoch !== epoch || (own.state === 'aborted' && !recorded))) {
      await fs.rm(this.recordFile(migrationId), { force: true });
      return false;
    }
    // Only a VM this migration put here is destroyed (with no ownership record, only its recorded shell).
    await this.removeShell(migrationId, own ? vmId : undefined);
    await this.deps.ownership.revoke(vmId, epoch, migrationId);
    this.deps.log.warn({ migrationId, vmId, epoch }, 'revoked: the operator declared this host lost during the migration and resumed the source; the copy here was destroyed');
    return true;
  }

  /** Stops and deletes the migration's incoming VM and its bookkeeping (the ownership record stays). */
  private async removeShell(migrationId: string, vmId?: string): Promise<void> {
    const inc = this.incoming.get(migrationId);
    await this.close(migrationId);
    const record = inc?.record ?? (await readJsonIfExists<IncomingRecord>(this.recordFile(migrationId)));
    const id = record?.vmId ?? vmId;
    if (id) {
      await this.deps.driver.destroy(asVmId(id)).catch((err) => this.deps.log.warn({ err: String(err), migrationId }, 'could not destroy the incoming VM'));
      // An incremental shell wrote over the base: it is no base any more.
      if ((await this.bases.get(id))?.inUseBy === migrationId) await this.bases.remove(id);
      if ((await this.ims.get(id))?.lineage === migrationId) await this.ims.remove(id);
    }
    await fs.rm(this.recordFile(migrationId), { force: true });
  }

  /** After postcopy: the VM runs here with no stale block; drop the migration's bookkeeping. */
  async finish(migrationId: string): Promise<{ fetches: number; staleWaits: StaleWaitStats; measured: Measured }> {
    const inc = await this.open(migrationId);
    const stale = (await inc.vm!.staleBlocks()).length;
    if (stale > 0) throw new Error(`${stale} blocks are still stale on the destination`);
    await inc.vm!.endPostcopy();
    await inc.measuring;
    const staleWaits = await inc.vm!.staleWaits();
    const measured = { ...inc.record.measured };
    if (measured.committedAtMs !== undefined && measured.downtimeMs === undefined) measured.downtimeMs = null;
    const fetches = inc.fetches;
    await this.close(migrationId);
    if ((await this.bases.get(inc.record.vmId))?.inUseBy === migrationId) await this.bases.remove(inc.record.vmId);
    await fs.rm(this.recordFile(migrationId), { force: true });
    return { fetches, staleWaits, measured };
  }

  async query(migrationId: string, vmId: string): Promise<QueryReply> {
    const own = await this.deps.ownership.get(vmId);
    let staleBlocks = 0;
    const inc = this.incoming.get(migrationId);
    if (inc?.vm && own?.state === 'running') staleBlocks = (await inc.vm.staleBlocks()).length;
    return { state: own?.state ?? null, epoch: own?.epoch ?? null, staleBlocks };
  }

  /** The incoming migrations recorded on this host (shells, and committed VMs whose migration has not finished). */
  async records(): Promise<{ record: IncomingRecord; committed: boolean }[]> {
    const names = await fs.readdir(this.dir).catch(() => [] as string[]);
    const out: { record: IncomingRecord; committed: boolean }[] = [];
    for (const name of names.filter((n) => n.endsWith('.json'))) {
      const record = await readJsonIfExists<IncomingRecord>(path.join(this.dir, name)).catch(() => null);
      if (!record) continue;
      const own = await this.deps.ownership.get(record.vmId);
      out.push({ record, committed: own?.state === 'running' && own.epoch === record.epoch && own.migrationId === record.migrationId });
    }
    return out;
  }

  /**
   * Re-open a migration a previous agent process left behind (agent restart). A crash between the
   * commit and the resume must not leave the only copy of the VM stopped: roll forward.
   */
  async recoverIncoming(migrationId: string): Promise<void> {
    const inc = await this.open(migrationId);
    const own = await this.deps.ownership.get(inc.record.vmId);
    if (own?.state !== 'running' || own.epoch !== inc.record.epoch) return;
    const state = (await inc.vm!.status()).state;
    if (inc.record.measured?.guestRunning === false) {
      if (state === 'incoming') await inc.vm!.pause(); // a cold migration: committed, and paused as it was
    } else if (state === 'incoming' || state === 'paused') {
      await inc.vm!.resume();
      this.deps.log.info({ migrationId: inc.record.migrationId, vmId: inc.record.vmId, epoch: own.epoch, was: state }, 'committed VM resumed after an agent restart');
    }
  }

  /** Data-plane admission: only a known migration at its exact epoch, and not a fenced one. */
  async accept(identity: SessionIdentity): Promise<SessionHandler> {
    const record = await readJsonIfExists<IncomingRecord>(this.recordFile(identity.migrationId));
    if (!record) {
      const own = await this.deps.ownership.get(identity.vmId);
      if (own && own.migrationId === identity.migrationId && own.epoch === identity.epoch) {
        // Finished or aborted migration: the source may still ask what happened.
        return this.statusOnlyHandler(identity);
      }
      throw new DataPlaneError('refused', `no incoming migration ${identity.migrationId} on this host`);
    }
    if (record.epoch !== identity.epoch || record.vmId !== identity.vmId) {
      throw new DataPlaneError(
        'refused',
        `migration ${identity.migrationId} expects VM ${record.vmId} epoch ${record.epoch}, not ${identity.vmId} epoch ${identity.epoch}`,
      );
    }
    return { onMessage: (session, msg) => this.applying(identity, msg, () => this.onMessage(identity.migrationId, session, msg)), onClose: (s) => this.onClose(identity.migrationId, s) };
  }

  /**
   * A message this host cannot apply is logged here and answered with an error that names this host,
   * so that the source can tell (and say) what went wrong where: ENOSPC on this host's filesystem, say.
   */
  private async applying(identity: SessionIdentity, msg: Message, apply: () => Promise<Message | void>): Promise<Message | void> {
    try {
      return await apply();
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      this.deps.log.warn({ migrationId: identity.migrationId, vmId: identity.vmId, messageType: msg.type, code: e.code, err: e.message }, 'could not apply a data-plane message');
      if (typeof e.code === 'string' && /^E[A-Z]+$/.test(e.code)) {
        throw new Error(`host ${this.deps.host}: ${e.message} (in ${this.deps.home}, applying migration ${identity.migrationId})`);
      }
      throw err;
    }
  }

  private statusOnlyHandler(identity: SessionIdentity): SessionHandler {
    return {
      onMessage: async (_session, msg) => {
        if (msg.type === Msg.Query || msg.type === Msg.Prepare || msg.type === Msg.Final || msg.type === Msg.Commit || msg.type === Msg.Abort) {
          return reply(await this.query(identity.migrationId, identity.vmId));
        }
        if (msg.type === Msg.StaleList) return { type: Msg.StaleList, meta: { count: 0, needed: [] }, data: Buffer.alloc(0) };
        throw new Error(`migration ${identity.migrationId} is no longer active on this host`);
      },
    };
  }

  private async onMessage(migrationId: string, session: ServerSession, msg: Message): Promise<Message | void> {
    const inc = await this.open(migrationId);
    const { record } = inc;
    switch (msg.type) {
      case Msg.Block: {
        const b = firstBlockOf(msg, record);
        const own = await this.deps.ownership.get(record.vmId);
        if (own?.state === 'running') {
          const items = [];
          for (let at = 0; at < msg.data.length; at += record.blockBytes) {
            items.push({ block: b + at / record.blockBytes, data: msg.data.subarray(at, at + record.blockBytes) });
          }
          await inc.vm!.deliverBlocks(record.blockBytes, items);
        } else {
          await this.expectIncoming(record, own?.state);
          await inc.disk!.write(b * record.blockBytes, msg.data);
        }
        return;
      }
      case Msg.StreamStart:
        checkProtocol(msg);
        await this.expectIncoming(record, (await this.deps.ownership.get(record.vmId))?.state);
        await this.startStream(inc, String(msg.meta.stream));
        return reply({});
      case Msg.State: {
        const s = inc.stream;
        if (!s || s.id !== msg.meta.stream) {
          throw new Error(`no machine-state stream ${String(msg.meta.stream)} here (this agent restarted, or a newer stream began): start a new stream`);
        }
        if (msg.meta.seq !== s.nextSeq) throw new Error(`stream ${s.id}: chunk ${String(msg.meta.seq)} arrived, ${s.nextSeq} was expected`);
        await s.sink.write(msg.data);
        s.nextSeq++;
        return;
      }
      case Msg.Sync:
        await inc.disk?.flush();
        return;
      case Msg.Final:
        return this.final(inc, msg);
      case Msg.Commit:
        return this.commit(inc);
      case Msg.Query:
        return reply(await this.query(migrationId, record.vmId));
      case Msg.Prepare:
        checkProtocol(msg);
        if ((await this.deps.ownership.get(record.vmId))?.state === 'incoming') {
          // Known before the commit, so a restart between the commit and the resume resumes only a running guest.
          await this.measure(inc, (m) => (m.guestRunning = msg.meta.guestRunning !== false));
          await this.deps.ownership.recordPrepared(record.vmId, record.epoch, migrationId);
        }
        return reply(await this.query(migrationId, record.vmId));
      case Msg.Abort:
        await this.abort(migrationId, record.vmId, record.epoch);
        return reply(await this.query(migrationId, record.vmId));
      case Msg.StaleList: {
        inc.postcopy = session;
        const stale = await inc.vm!.staleBlocks();
        if (stale.length === 0) await this.measure(inc, (m) => (m.postcopyDoneAtMs ??= Date.now()));
        const blocks = Math.ceil(record.spec.diskBytes / record.blockBytes);
        const needed = [...inc.needed];
        inc.needed.clear();
        return { type: Msg.StaleList, meta: { count: stale.length, needed }, data: indicesToBitmap(stale, blocks) };
      }
      default:
        throw new Error(`unknown message type ${msg.type}`);
    }
  }

  /**
   * A new machine-state stream goes into an incoming VM process that never took one: the one started
   * for this migration, else a fresh one (a hypervisor loads one stream per process, as QEMU does).
   */
  private async startStream(inc: Incoming, id: string): Promise<void> {
    if (inc.stream?.id === id) return; // a resent request
    inc.stream?.sink.close();
    inc.stream = null;
    inc.final = null;
    const vmId = asVmId(inc.record.vmId);
    if (!inc.fresh) {
      await this.reopen(inc, async () => {
        await this.deps.driver.kill(vmId);
        (await this.deps.driver.start(vmId)).close();
      });
    }
    inc.fresh = false;
    inc.stream = { id, nextSeq: 0, sink: await inc.vm!.migrateIn() };
  }

  /** The freeze: the source paused the guest and sends the stale set before the rest of the stream. */
  private async final(inc: Incoming, msg: Message): Promise<Message> {
    const { record } = inc;
    const own = await this.deps.ownership.get(record.vmId);
    if (own?.state === 'running' && own.epoch === record.epoch) return reply({ state: 'running', epoch: record.epoch });
    await this.expectIncoming(record, own?.state);
    if (!inc.stream) throw new Error(`no machine-state stream is loading for migration ${record.migrationId}: the Final message has nothing to go with`);
    const blocks = Math.ceil(record.spec.diskBytes / record.blockBytes);
    if (msg.meta.blockBytes !== record.blockBytes || msg.data.length !== Math.ceil(blocks / 8)) {
      throw new Error(`the stale bitmap must be ${Math.ceil(blocks / 8)} bytes at ${record.blockBytes}-byte blocks, got ${msg.data.length} at ${String(msg.meta.blockBytes)}`);
    }
    // The bitmap is the truth: a count that disagrees with it means a corrupt or foreign message.
    const stale = new BlockSet(record.spec.diskBytes, record.blockBytes, msg.data);
    if (Number(msg.meta.staleCount) !== stale.size) {
      throw new Error(`the Final message counts ${String(msg.meta.staleCount)} stale blocks but its bitmap names ${stale.size}: the source must send the switchover again`);
    }
    inc.final = {
      bits: Buffer.from(stale.bits),
      count: stale.size,
      lastHeartbeatMs: typeof msg.meta.lastHeartbeatMs === 'number' ? msg.meta.lastHeartbeatMs : null,
      guestRunning: msg.meta.guestRunning !== false,
    };
    await this.deps.ownership.recordPrepared(record.vmId, record.epoch, record.migrationId); // already durable since Prepare, unless the source skipped it
    return reply(await this.query(record.migrationId, record.vmId));
  }

  /** The commit point: the whole stream is loaded and the stale set is in place; record running(e), resume. */
  private async commit(inc: Incoming): Promise<Message> {
    const { record } = inc;
    const { vmId, epoch, migrationId } = record;
    const own = await this.deps.ownership.get(vmId);
    if (own?.state === 'running' && own.epoch === epoch) return reply({ state: 'running', epoch }); // a retried Commit
    await this.expectIncoming(record, own?.state);
    const final = inc.final;
    if (!final || !inc.stream) throw new Error(`migration ${migrationId} has no Final message and stream here: the source must start the switchover again`);
    await withTimeout(inc.stream.sink.completed, STREAM_LOAD_TIMEOUT_MS, `the hypervisor did not finish loading the machine-state stream within ${STREAM_LOAD_TIMEOUT_MS} ms`);
    const vm = inc.vm!;
    if (final.count > 0) await vm.setStale({ generation: 0, blockBytes: record.blockBytes, bits: final.bits, count: final.count });
    // Writes are tracked from the first guest instruction here: the next migration away can be incremental.
    if (!(await vm.listBitmaps()).some((b) => b.name === IM_BITMAP)) await vm.addBitmap(IM_BITMAP, { blockBytes: record.blockBytes, persistent: true });
    await this.deps.ownership.recordPrepared(vmId, epoch, migrationId);
    await faultPoint('switchover-after-prepared');
    await this.deps.ownership.commit(vmId, epoch, migrationId);
    const committedAtMs = Date.now();
    await faultPoint('switchover-after-commit');
    if (final.guestRunning) await vm.resume();
    else await vm.pause();
    this.deps.log.info({ migrationId, vmId, epoch, staleBlocks: final.count, guestRunning: final.guestRunning }, 'committed: VM resumed on this host');
    await this.measure(inc, (m) => {
      m.committedAtMs = committedAtMs;
      m.sourceHeartbeatMs = final.lastHeartbeatMs;
      m.staleAtCommit = final.count;
      if (final.count === 0) m.postcopyDoneAtMs = committedAtMs;
    });
    if (final.guestRunning && final.lastHeartbeatMs !== null) inc.measuring = this.measureDowntime(inc, committedAtMs, final.lastHeartbeatMs);
    return reply({ state: 'running', epoch });
  }

  /** The guest-observed freeze: from its last heartbeat on the source to its first one here. */
  private async measureDowntime(inc: Incoming, sinceMs: number, sourceHeartbeatMs: number): Promise<void> {
    try {
      const first = await inc.vm!.nextHeartbeat(sinceMs, HEARTBEAT_TIMEOUT_MS);
      await this.measure(inc, (m) => (m.downtimeMs = first === null ? null : Math.round((first - sourceHeartbeatMs) * 10) / 10));
    } catch (err) {
      this.deps.log.warn({ migrationId: inc.record.migrationId, err: String(err) }, 'could not measure the downtime');
    }
  }

  private async measure(inc: Incoming, update: (m: Measured) => void): Promise<void> {
    const measured = { ...inc.record.measured };
    update(measured);
    if (JSON.stringify(measured) === JSON.stringify(inc.record.measured ?? {})) return;
    inc.record = { ...inc.record, measured };
    if (await readJsonIfExists<IncomingRecord>(this.recordFile(inc.record.migrationId))) {
      await writeFileDurable(this.recordFile(inc.record.migrationId), JSON.stringify(inc.record, null, 2));
    }
  }

  private async expectIncoming(record: IncomingRecord, state: string | undefined): Promise<void> {
    if (state !== 'incoming' && state !== 'prepared') {
      throw new Error(`VM ${record.vmId} epoch ${record.epoch} is ${state ?? 'unknown'} here; refusing data for migration ${record.migrationId}`);
    }
  }

  private async open(migrationId: string): Promise<Incoming> {
    const existing = this.incoming.get(migrationId);
    if (existing) return existing;
    const record = await readJsonIfExists<IncomingRecord>(this.recordFile(migrationId));
    if (!record) throw new Error(`no incoming migration ${migrationId} on this host`);
    const inc: Incoming = { record, vm: null, disk: null, postcopy: null, needed: new Set(), fetches: 0, unsubscribe: null, stream: null, fresh: false, final: null, measuring: null };
    this.incoming.set(migrationId, inc);
    try {
      await this.attach(inc);
    } catch (err) {
      this.incoming.delete(migrationId);
      inc.vm?.close();
      throw err;
    }
    return inc;
  }

  private async attach(inc: Incoming): Promise<void> {
    inc.vm = await this.deps.driver.attach(asVmId(inc.record.vmId));
    inc.disk = await inc.vm.openDisk();
    inc.unsubscribe = inc.vm.onBlockNeeded((block) => this.onBlockNeeded(inc, block));
  }

  /** Lets go of the VM process, runs `change` (a restart), and attaches again. */
  private async reopen(inc: Incoming, change: () => Promise<void>): Promise<void> {
    inc.unsubscribe?.();
    await inc.disk?.close().catch(() => undefined);
    inc.vm?.close();
    inc.vm = null;
    inc.disk = null;
    await change();
    await this.attach(inc);
  }

  private onBlockNeeded(inc: Incoming, block: number): void {
    inc.fetches++;
    if (inc.postcopy) {
      inc.postcopy.push({ type: Msg.Fetch, meta: { blocks: [block] }, data: Buffer.alloc(0) });
    } else {
      inc.needed.add(block);
    }
  }

  private onClose(migrationId: string, session: ServerSession): void {
    const inc = this.incoming.get(migrationId);
    if (inc && inc.postcopy === session) inc.postcopy = null;
  }

  private async close(migrationId: string): Promise<void> {
    const inc = this.incoming.get(migrationId);
    if (!inc) return;
    this.incoming.delete(migrationId);
    inc.unsubscribe?.();
    inc.stream?.sink.close();
    await inc.disk?.close().catch(() => undefined);
    inc.vm?.close();
  }

  private recordFile(migrationId: string): string {
    return path.join(this.dir, `${migrationId}.json`);
  }
}

/** The block a Block message carries: an index inside the disk and exactly that block's bytes. */
/** The first block of a Block message's run of consecutive blocks, checked against the disk. */
function firstBlockOf(msg: Message, record: IncomingRecord): number {
  const { blockBytes, spec } = record;
  const blocks = Math.ceil(spec.diskBytes / blockBytes);
  const b = msg.meta.b;
  if (typeof b !== 'number' || !Number.isSafeInteger(b) || b < 0 || b >= blocks) {
    throw new Error(`block ${JSON.stringify(b)} is not a block of VM ${record.vmId}'s disk (0..${blocks - 1} at ${blockBytes} bytes)`);
  }
  const end = b * blockBytes + msg.data.length;
  if (msg.data.length === 0 || end > spec.diskBytes || (msg.data.length % blockBytes !== 0 && end !== spec.diskBytes)) {
    throw new Error(
      `blocks from ${b} of VM ${record.vmId}: the message carries ${msg.data.length} bytes, not whole ${blockBytes}-byte blocks inside the disk (${spec.diskBytes} bytes)`,
    );
  }
  return b;
}

function isOutOfSpace(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

function checkProtocol(msg: Message): void {
  if (msg.meta.protocol !== MIGRATION_PROTOCOL) {
    throw new Error(
      `the source speaks migration protocol ${JSON.stringify(msg.meta.protocol ?? 1)}, this destination ${MIGRATION_PROTOCOL}: run the same Ferry version on both hosts`,
    );
  }
}

async function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(message)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

function reply(meta: object): Message {
  return { type: Msg.Query, meta: meta as Record<string, unknown>, data: Buffer.alloc(0) };
}

