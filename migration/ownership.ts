// The durable ownership epoch of every VM on this host (DESIGN invariant 1).
//
//   source:       running(e) ──commit seen──▶ released(e)
//   destination:  incoming(e+1) ─▶ prepared(e+1) ─▶ running(e+1)      (commit point)
//                        └──────────────┴──▶ aborted(e+1)             (fenced: never resumes e+1)
//                        └──────────────┴───────────┴──▶ aborted(e+1) (revoked: the host was declared lost)
//
// Every transition is written atomically and fsynced before it is acted on.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { readJsonIfExists, writeFileDurable } from '../common/durable-file';

export type OwnershipState = 'running' | 'incoming' | 'prepared' | 'aborted' | 'released';

export interface OwnershipRecord {
  vmId: string;
  epoch: number;
  state: OwnershipState;
  migrationId: string | null;
  updatedAt: string;
}

export class OwnershipConflict extends Error {
  constructor(
    message: string,
    readonly current: OwnershipRecord | null,
  ) {
    super(message);
    this.name = 'OwnershipConflict';
  }
}

export class OwnershipStore {
  private readonly dir: string;
  private readonly locks = new Map<string, Promise<unknown>>();
  /**
   * The last record read or durably written, per VM: the data plane asks for every message it applies.
   * This store is the only writer of its directory, so the cache never differs from the file.
   */
  private readonly cache = new Map<string, OwnershipRecord | null>();

  constructor(home: string) {
    this.dir = path.join(home, 'ownership');
  }

  async get(vmId: string): Promise<OwnershipRecord | null> {
    if (this.cache.has(vmId)) return copy(this.cache.get(vmId)!);
    const record = await readJsonIfExists<OwnershipRecord>(this.file(vmId));
    this.cache.set(vmId, record);
    return copy(record);
  }

  async list(): Promise<OwnershipRecord[]> {
    let names: string[];
    try {
      names = await fs.readdir(this.dir);
    } catch {
      return [];
    }
    const records = await Promise.all(
      names.filter((n) => n.endsWith('.json')).map((n) => readJsonIfExists<OwnershipRecord>(path.join(this.dir, n))),
    );
    return records.filter((r): r is OwnershipRecord => r !== null);
  }

  /** A VM created on this host starts at epoch 1. */
  claimNew(vmId: string): Promise<OwnershipRecord> {
    return this.transition(vmId, (cur) => {
      if (cur && (cur.state === 'running' || cur.state === 'incoming' || cur.state === 'prepared')) {
        throw new OwnershipConflict(`VM ${vmId} already exists on this host (${cur.state} at epoch ${cur.epoch})`, cur);
      }
      return { epoch: cur ? cur.epoch + 1 : 1, state: 'running', migrationId: null };
    });
  }

  recordIncoming(vmId: string, epoch: number, migrationId: string): Promise<OwnershipRecord> {
    return this.transition(vmId, (cur) => {
      if (cur && cur.epoch === epoch && cur.migrationId === migrationId && (cur.state === 'incoming' || cur.state === 'prepared')) {
        return null; // idempotent retry
      }
      if (cur && (cur.state === 'running' || cur.state === 'incoming' || cur.state === 'prepared')) {
        throw new OwnershipConflict(
          `host already holds VM ${vmId} (${cur.state} at epoch ${cur.epoch}); it cannot receive epoch ${epoch}`,
          cur,
        );
      }
      // A fence is per migration: another attempt may reuse the epoch an aborted one never ran.
      const reusesAbortedEpoch = cur?.state === 'aborted' && cur.epoch === epoch && cur.migrationId !== migrationId;
      if (cur && cur.epoch >= epoch && !reusesAbortedEpoch) {
        throw new OwnershipConflict(`epoch ${epoch} for VM ${vmId} is not newer than this host's epoch ${cur.epoch} (${cur.state})`, cur);
      }
      return { epoch, state: 'incoming', migrationId };
    });
  }

  recordPrepared(vmId: string, epoch: number, migrationId: string): Promise<OwnershipRecord> {
    return this.transition(vmId, (cur) => {
      this.expectMigration(vmId, cur, epoch, migrationId);
      if (cur!.state === 'prepared' || cur!.state === 'running') return null;
      if (cur!.state !== 'incoming') throw new OwnershipConflict(`VM ${vmId} epoch ${epoch} is ${cur!.state}; it cannot be prepared`, cur);
      return { epoch, state: 'prepared', migrationId };
    });
  }

  /** The commit point: from here on the migration only rolls forward. */
  commit(vmId: string, epoch: number, migrationId: string): Promise<OwnershipRecord> {
    return this.transition(vmId, (cur) => {
      this.expectMigration(vmId, cur, epoch, migrationId);
      if (cur!.state === 'running') return null;
      if (cur!.state !== 'prepared') throw new OwnershipConflict(`VM ${vmId} epoch ${epoch} is ${cur!.state}; only a prepared epoch can commit`, cur);
      return { epoch, state: 'running', migrationId };
    });
  }

  /** Fence: this host will never resume the given epoch. Refused once the epoch is running. */
  abortIncoming(vmId: string, epoch: number, migrationId: string): Promise<OwnershipRecord> {
    return this.transition(vmId, (cur) => {
      // This host runs its own copy (its prepare for this migration was refused): keep that record.
      // No fence is needed, since recordIncoming refuses every epoch while it runs.
      if (cur?.state === 'running' && cur.migrationId !== migrationId) return null;
      if (!cur || cur.epoch < epoch) {
        // Never heard of it (prepare never ran here): record the fence so a late prepare is refused too.
        return { epoch, state: 'aborted', migrationId };
      }
      if (cur.epoch > epoch) return null;
      if (cur.state === 'aborted') return null;
      if (cur.state === 'running' || cur.state === 'released') {
        throw new OwnershipConflict(`VM ${vmId} epoch ${epoch} already committed on this host; it cannot be aborted`, cur);
      }
      return { epoch, state: 'aborted', migrationId };
    });
  }

  /**
   * An operator declared this host lost while it held the migration's epoch (`ferry resolve
   * --destination-lost`) and the source runs the VM again: this host never runs that epoch, even
   * if it had committed it. Another migration's record, or a newer epoch, is left alone.
   */
  revoke(vmId: string, epoch: number, migrationId: string): Promise<OwnershipRecord> {
    return this.transition(vmId, (cur) => {
      if (cur && (cur.epoch !== epoch || cur.migrationId !== migrationId || cur.state === 'aborted')) return null;
      return { epoch, state: 'aborted', migrationId };
    });
  }

  /** Source side, after the destination committed epoch+1. */
  release(vmId: string, epoch: number, migrationId: string): Promise<OwnershipRecord> {
    return this.transition(vmId, (cur) => {
      if (!cur) throw new OwnershipConflict(`no ownership record for VM ${vmId}`, cur);
      if (cur.state === 'released' && cur.epoch === epoch) return null;
      if (cur.state !== 'running' || cur.epoch !== epoch) {
        throw new OwnershipConflict(`VM ${vmId} is ${cur.state} at epoch ${cur.epoch}; cannot release epoch ${epoch}`, cur);
      }
      return { epoch, state: 'released', migrationId };
    });
  }

  async remove(vmId: string): Promise<void> {
    await fs.rm(this.file(vmId), { force: true });
    this.cache.set(vmId, null);
  }

  private expectMigration(vmId: string, cur: OwnershipRecord | null, epoch: number, migrationId: string): void {
    if (!cur || cur.epoch !== epoch || cur.migrationId !== migrationId) {
      throw new OwnershipConflict(
        `VM ${vmId}: this host has no incoming epoch ${epoch} for migration ${migrationId}` +
          (cur ? ` (it has ${cur.state} at epoch ${cur.epoch})` : ''),
        cur,
      );
    }
  }

  private file(vmId: string): string {
    return path.join(this.dir, `${vmId}.json`);
  }

  /** Serialise transitions per VM; `next` returns the new record fields, or null to keep the current one. */
  private transition(
    vmId: string,
    next: (cur: OwnershipRecord | null) => Omit<OwnershipRecord, 'vmId' | 'updatedAt'> | null,
  ): Promise<OwnershipRecord> {
    const prev = this.locks.get(vmId) ?? Promise.resolve();
    const run = prev.catch(() => undefined).then(async () => {
      const cur = await this.get(vmId);
      const fields = next(cur);
      if (!fields) return cur!;
      const record: OwnershipRecord = { vmId, ...fields, updatedAt: new Date().toISOString() };
      await writeFileDurable(this.file(vmId), JSON.stringify(record, null, 2));
      this.cache.set(vmId, record);
      return { ...record };
    });
    this.locks.set(vmId, run);
    return run;
  }
}

function copy(record: OwnershipRecord | null): OwnershipRecord | null {
  return record && { ...record };
}
