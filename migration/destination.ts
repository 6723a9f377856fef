// The destination role: an incoming VM shell that the source fills over the data plane, the
// commit point, and the postcopy service (stale blocks, on-demand fetches).
import path from 'node:path';
import { promises as fs } from 'node:fs';
import type { DiskAccess, HypervisorDriver, VmHandle, VmSpec } from '../hypervisor/driver';
import type { Message, ServerSession, SessionHandler, SessionIdentity } from '../dataplane/api';
import { DataPlaneError } from '../dataplane/api';
import { readJsonIfExists, writeFileDurable } from '../common/durable-file';
import { vmId as asVmId } from '../common/types';
import { OwnershipStore } from './ownership';
import { BaseStore, IM_BITMAP, ImStore, digestFile } from './bases';
import { Msg, indicesToBitmap, type QueryReply } from './messages';
import type { Logger } from '../common/log';

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
}

export class Destination {
  private readonly incoming = new Map<string, Incoming>();
  private readonly dir: string;
  private readonly bases: BaseStore;
  private readonly ims: ImStore;

  constructor(
    private readonly deps: { driver: HypervisorDriver; ownership: OwnershipStore; home: string; log: Logger },
  ) {
    this.dir = path.join(deps.home, 'incoming');
    this.bases = new BaseStore(deps.home);
    this.ims = new ImStore(deps.home);
  }

  /**
   * Create (or find again, on a retry) the incoming shell for a migration. Idempotent. With an
   * incremental request, builds on this host's base of the VM when its lineage, sizes and digest
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
    if (status.state === 'stopped') await this.deps.driver.start(id);
    const inc = await this.open(request.migrationId);
    // Writes are tracked from the first guest instruction here: the next migration away can be incremental.
    if (!(await inc.vm!.listBitmaps()).some((b) => b.name === IM_BITMAP)) {
      await inc.vm!.addBitmap(IM_BITMAP, { blockBytes: request.blockBytes, persistent: true });
    }
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
    const digest = await digestFile(this.deps.driver.diskPath(asVmId(request.vmId))).catch(() => 'missing');
    if (digest !== base.digest) return full('the base image digest does not match: the base was changed or damaged since it was kept');
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

  /** Fence the epoch (never resumed here) and remove the shell. Refused after the commit. */
  async abort(migrationId: string, vmId: string, epoch: number): Promise<void> {
    await this.deps.ownership.abortIncoming(vmId, epoch, migrationId);
    const inc = this.incoming.get(migrationId);
    await this.close(migrationId);
    const record = inc?.record ?? (await readJsonIfExists<IncomingRecord>(this.recordFile(migrationId)));
    if (record) {
      await this.deps.driver.destroy(asVmId(record.vmId)).catch((err) =>
        this.deps.log.warn({ err: String(err), migrationId }, 'could not destroy aborted incoming VM'),
      );
      // An incremental shell wrote over the base: it is no base any more.
      if ((await this.bases.get(record.vmId))?.inUseBy === migrationId) await this.bases.remove(record.vmId);
      if ((await this.ims.get(record.vmId))?.lineage === migrationId) await this.ims.remove(record.vmId);
    }
    await fs.rm(this.recordFile(migrationId), { force: true });
  }

  /** After postcopy: the VM runs here with no stale block; drop the migration's bookkeeping. */
  async finish(migrationId: string): Promise<{ staleBlocks: number; fetches: number }> {
    const inc = await this.open(migrationId);
    const stale = (await inc.vm!.staleBlocks()).length;
    if (stale > 0) throw new Error(`${stale} blocks are still stale on the destination`);
    const fetches = inc.fetches;
    await this.close(migrationId);
    if ((await this.bases.get(inc.record.vmId))?.inUseBy === migrationId) await this.bases.remove(inc.record.vmId);
    await fs.rm(this.recordFile(migrationId), { force: true });
    return { staleBlocks: 0, fetches };
  }

  async query(migrationId: string, vmId: string): Promise<QueryReply> {
    const own = await this.deps.ownership.get(vmId);
    let staleBlocks = 0;
    const inc = this.incoming.get(migrationId);
    if (inc?.vm && own?.state === 'running') staleBlocks = (await inc.vm.staleBlocks()).length;
    return { state: own?.state ?? null, epoch: own?.epoch ?? null, staleBlocks };
  }

  /** Re-open the migrations a previous agent process left behind (agent restart). */
  async recover(): Promise<void> {
    let names: string[] = [];
    try {
      names = await fs.readdir(this.dir);
    } catch {
      return;
    }
    for (const name of names.filter((n) => n.endsWith('.json'))) {
      const id = name.slice(0, -'.json'.length);
      try {
        await this.open(id);
      } catch (err) {
        this.deps.log.warn({ migrationId: id, err: String(err) }, 'could not reopen incoming migration');
      }
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
    return { onMessage: (session, msg) => this.onMessage(identity.migrationId, session, msg), onClose: (s) => this.onClose(identity.migrationId, s) };
  }

  private statusOnlyHandler(identity: SessionIdentity): SessionHandler {
    return {
      onMessage: async (_session, msg) => {
        if (msg.type === Msg.Query || msg.type === Msg.Final || msg.type === Msg.Abort) {
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
        const b = blockOf(msg, record);
        const own = await this.deps.ownership.get(record.vmId);
        if (own?.state === 'running') {
          await inc.vm!.deliverBlocks(record.blockBytes, [{ block: b, data: msg.data }]);
        } else {
          await this.expectIncoming(record, own?.state);
          await inc.disk!.write(b * record.blockBytes, msg.data);
        }
        return;
      }
      case Msg.Pages: {
        await this.expectIncoming(record, (await this.deps.ownership.get(record.vmId))?.state);
        await inc.vm!.writePages(Number(msg.meta.p), msg.data);
        return;
      }
      case Msg.Sync:
        await inc.disk?.flush();
        return;
      case Msg.Final:
        return this.commit(inc, msg);
      case Msg.Query:
        return reply(await this.query(migrationId, record.vmId));
      case Msg.Abort:
        await this.abort(migrationId, record.vmId, record.epoch);
        return reply(await this.query(migrationId, record.vmId));
      case Msg.StaleList: {
        inc.postcopy = session;
        const stale = await inc.vm!.staleBlocks();
        const blocks = Math.ceil(record.spec.diskBytes / record.blockBytes);
        const needed = [...inc.needed];
        inc.needed.clear();
        return { type: Msg.StaleList, meta: { count: stale.length, needed }, data: indicesToBitmap(stale, blocks) };
      }
      default:
        throw new Error(`unknown message type ${msg.type}`);
    }
  }

  /** The freeze-and-copy handoff: load the state, mark the stale blocks, commit, resume. */
  private async commit(inc: Incoming, msg: Message): Promise<Message> {
    const { record } = inc;
    const { vmId, epoch, migrationId } = record;
    const own = await this.deps.ownership.get(vmId);
    if (own?.state === 'running' && own.epoch === epoch) return reply({ state: 'running', epoch }); // retried Final
    const stateBytes = Number(msg.meta.stateBytes);
    const state = msg.data.subarray(0, stateBytes);
    const bits = msg.data.subarray(stateBytes);
    const count = Number(msg.meta.staleCount);
    const vm = inc.vm!;
    await vm.loadState(state);
    await vm.setStale({ generation: 0, blockBytes: record.blockBytes, bits: Buffer.from(bits), count });
    await this.deps.ownership.recordPrepared(vmId, epoch, migrationId);
    await this.deps.ownership.commit(vmId, epoch, migrationId);
    await vm.resume();
    this.deps.log.info({ migrationId, vmId, epoch, staleBlocks: count }, 'committed: VM resumed on this host');
    return reply({ state: 'running', epoch });
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
    const id = asVmId(record.vmId);
    const inc: Incoming = { record, vm: null, disk: null, postcopy: null, needed: new Set(), fetches: 0, unsubscribe: null };
    this.incoming.set(migrationId, inc);
    try {
      inc.vm = await this.deps.driver.attach(id);
      inc.disk = await inc.vm.openDisk();
      inc.unsubscribe = inc.vm.onBlockNeeded((block) => this.onBlockNeeded(inc, block));
    } catch (err) {
      this.incoming.delete(migrationId);
      inc.vm?.close();
      throw err;
    }
    return inc;
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
    await inc.disk?.close().catch(() => undefined);
    inc.vm?.close();
  }

  private recordFile(migrationId: string): string {
    return path.join(this.dir, `${migrationId}.json`);
  }
}

/** The block a Block message carries: an index inside the disk and exactly that block's bytes. */
function blockOf(msg: Message, record: IncomingRecord): number {
  const { blockBytes, spec } = record;
  const blocks = Math.ceil(spec.diskBytes / blockBytes);
  const b = msg.meta.b;
  if (typeof b !== 'number' || !Number.isSafeInteger(b) || b < 0 || b >= blocks) {
    throw new Error(`block ${JSON.stringify(b)} is not a block of VM ${record.vmId}'s disk (0..${blocks - 1} at ${blockBytes} bytes)`);
  }
  const length = Math.min(blockBytes, spec.diskBytes - b * blockBytes);
  if (msg.data.length !== length) throw new Error(`block ${b} of VM ${record.vmId} is ${length} bytes, the message carries ${msg.data.length}`);
  return b;
}

function reply(meta: object): Message {
  return { type: Msg.Query, meta: meta as Record<string, unknown>, data: Buffer.alloc(0) };
}

