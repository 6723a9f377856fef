// Incremental migration bookkeeping on a host (the paper's IM algorithm).
//
// After a migration M moves a VM from A to B:
//   - A keeps the VM's disk as it was at the freeze: a *base* with lineage M and a content digest;
//   - B tracks every guest write since the commit in a persistent bitmap `im`, with lineage M.
// Moving the VM back B→A then sends only the blocks in B's `im` bitmap onto A's base, provided the
// lineages match, the bitmap is valid and the base's digest is intact. Anything else: a full copy.
import path from 'node:path';
import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import { readJsonIfExists, writeFileDurable } from '../common/durable-file';

export const IM_BITMAP = 'im';

export interface BaseRecord {
  vmId: string;
  /** The migration whose freeze produced this disk. */
  lineage: string;
  diskBytes: number;
  blockBytes: number;
  /** sha256 of the image when it was kept. */
  digest: string;
  createdAt: string;
  /** The incoming migration building on this base right now, if any. */
  inUseBy: string | null;
}

export interface ImRecord {
  vmId: string;
  lineage: string;
  diskBytes: number;
  blockBytes: number;
  startedAt: string;
}

export class BaseInUse extends Error {}

export async function digestFile(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** One JSON record per VM in a directory of the host's home; writes are atomic and fsynced. */
class RecordDir<T extends { vmId: string }> {
  constructor(private readonly dir: string) {}

  get(vmId: string): Promise<T | null> {
    return readJsonIfExists<T>(path.join(this.dir, `${vmId}.json`));
  }

  async put(record: T): Promise<void> {
    await writeFileDurable(path.join(this.dir, `${record.vmId}.json`), JSON.stringify(record, null, 2));
  }

  async remove(vmId: string): Promise<void> {
    await fs.rm(path.join(this.dir, `${vmId}.json`), { force: true });
  }

  async list(): Promise<T[]> {
    const names = await fs.readdir(this.dir).catch(() => [] as string[]);
    const all: (T | null)[] = await Promise.all(names.filter((n) => n.endsWith('.json')).map((n) => this.get(n.slice(0, -5))));
    return all.filter((r): r is T => r !== null);
  }
}

export class BaseStore extends RecordDir<BaseRecord> {
  constructor(home: string) {
    super(path.join(home, 'bases'));
  }

  /** Deleting a base an incoming migration builds on is refused. */
  async removeUnused(vmId: string): Promise<void> {
    const base = await this.get(vmId);
    if (base?.inUseBy) throw new BaseInUse(`the base of VM ${vmId} is in use by migration ${base.inUseBy}: wait for it to end or abort it`);
    await this.remove(vmId);
  }
}

export class ImStore extends RecordDir<ImRecord> {
  constructor(home: string) {
    super(path.join(home, 'im'));
  }
}
