import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { BaseInUse, BaseStore, digestFile, fingerprintFile } from '../../migration/bases';

let dir: string;
beforeEach(async () => (dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-bases-'))));
afterEach(() => fs.rm(dir, { recursive: true, force: true }));

const base = { vmId: 'vm1', lineage: 'm1', diskBytes: 4096, blockBytes: 4096, fingerprint: 'x', createdAt: '', inUseBy: null };

it('refuses to delete a base an incoming migration builds on', async () => {
  const store = new BaseStore(dir);
  await store.put({ ...base, inUseBy: 'm2' });
  await expect(store.removeUnused('vm1')).rejects.toBeInstanceOf(BaseInUse);
  await store.put(base);
  await store.removeUnused('vm1');
  expect(await store.list()).toEqual([]);
});

it('digests change with one byte', async () => {
  const f = path.join(dir, 'img');
  await fs.writeFile(f, Buffer.alloc(1 << 20));
  const before = await digestFile(f);
  const fh = await fs.open(f, 'r+');
  await fh.write(Buffer.from([1]), 0, 1, 777);
  await fh.close();
  expect(await digestFile(f)).not.toBe(before);
});

it('a base is intact while untouched, or when its content still has the digest; one byte changed is not', async () => {
  const store = new BaseStore(dir);
  const f = path.join(dir, 'img');
  await fs.writeFile(f, Buffer.alloc(1 << 20, 7));
  const kept = { ...base, fingerprint: await fingerprintFile(f) };
  expect(await store.intact(kept, f)).toBe(true);
  await store.digestLater(kept, f);
  // Rewritten with the same bytes: the fingerprint changed, the digest still matches.
  await fs.writeFile(f, Buffer.alloc(1 << 20, 7));
  expect(await fingerprintFile(f)).not.toBe(kept.fingerprint);
  expect(await store.intact(kept, f)).toBe(true);
  const fh = await fs.open(f, 'r+');
  await fh.write(Buffer.from([1]), 0, 1, 777);
  await fh.close();
  expect(await store.intact(kept, f)).toBe(false);
  await store.remove(kept.vmId);
  expect(await store.intact(kept, f)).toBe(false); // no digest left to check a changed image against
  expect(await store.intact(kept, path.join(dir, 'missing'))).toBe(false);
});
