// Incremental migration bookkeeping on a host (the paper's IM algorithm).
//
// After a migration M moves a VM from A to B:
//   - A keeps the VM's disk as it was at the freeze: a *base* with lineage M, the image's fingerprint
//     (device, inode, size, mtime, ctime) and, computed in the background, its sha256 digest;
//   - B tracks every guest write since the commit in a persistent bitmap `im`, with lineage M.
// Moving the VM back B→A then sends only the blocks in B's `im` bitmap onto A's base, provided the
// lineages match, the bitmap is valid and the base is intact. Anything else: a full copy.
// Intact: the fingerprint is unchanged (no write reached the image: ctime cannot be set back), or,
// if it changed, the content still has the digest. Hashing a large image takes seconds, so neither
// keeping a base nor building on an untouched one waits for it.
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
  /** fingerprintFile() of the image when it was kept. */
  fingerprint: string;
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

/** sha256 of a base image, and the fingerprint the image had all the while it was hashed. */
export interface BaseDigest {
  vmId: string;
  fingerprint: string;
  digest: string;
}

export class BaseInUse extends Error {}

/** What any write to the file (or a replacement of it) changes. */
export async function fingerprintFile(file: string): Promise<string> {
  const st = await fs.stat(file, { bigint: true });
  return [st.dev, st.ino, st.size, st.mtimeNs, st.ctimeNs].join(':');
}

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
  private readonly digests: RecordDir<BaseDigest>;

  constructor(home: string) {
    super(path.join(home, 'bases'));
    this.digests = new RecordDir<BaseDigest>(path.join(home, 'base-digests'));
  }

  override async remove(vmId: string): Promise<void> {
    await super.remove(vmId);
    await this.digests.remove(vmId);
  }

  /** Hash the kept image (call it without waiting); the digest counts only if the image held still meanwhile. */
  async digestLater(base: BaseRecord, file: string): Promise<void> {
    const digest = await digestFile(file);
    if ((await fingerprintFile(file)) !== base.fingerprint) return;
    await this.digests.put({ vmId: base.vmId, fingerprint: base.fingerprint, digest });
  }

  /** Whether the image at `file` is still the base as it was kept (see the top of this file). */
  async intact(base: BaseRecord, file: string): Promise<boolean> {
    const now = await fingerprintFile(file).catch(() => null);
    if (now === null) return false;
    if (now === base.fingerprint) return true;
    const kept = await this.digests.get(base.vmId);
    return kept?.fingerprint === base.fingerprint && (await digestFile(file)) === kept.digest;
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
