import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { OwnershipConflict, OwnershipStore } from '../../migration/ownership';

let dir: string;
let store: OwnershipStore;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-own-'));
  store = new OwnershipStore(dir);
});
afterEach(() => fs.rm(dir, { recursive: true, force: true }));

describe('ownership epochs', () => {
  it('walks incoming → prepared → running and persists every step', async () => {
    await store.recordIncoming('vm1', 2, 'm1');
    await store.recordPrepared('vm1', 2, 'm1');
    await store.commit('vm1', 2, 'm1');
    const again = new OwnershipStore(dir);
    expect(await again.get('vm1')).toMatchObject({ epoch: 2, state: 'running', migrationId: 'm1' });
  });

  it('never commits a fenced epoch, and never aborts a committed one', async () => {
    await store.recordIncoming('vm1', 2, 'm1');
    await store.recordPrepared('vm1', 2, 'm1');
    await store.abortIncoming('vm1', 2, 'm1');
    await expect(store.commit('vm1', 2, 'm1')).rejects.toBeInstanceOf(OwnershipConflict);
    await expect(store.recordPrepared('vm1', 2, 'm1')).rejects.toBeInstanceOf(OwnershipConflict);

    await store.recordIncoming('vm2', 5, 'm2');
    await store.recordPrepared('vm2', 5, 'm2');
    await store.commit('vm2', 5, 'm2');
    await expect(store.abortIncoming('vm2', 5, 'm2')).rejects.toBeInstanceOf(OwnershipConflict);
  });

  it('revokes an epoch a host committed once the operator declared that host lost, and leaves other migrations alone', async () => {
    await store.recordIncoming('vm1', 2, 'm1');
    await store.recordPrepared('vm1', 2, 'm1');
    await store.commit('vm1', 2, 'm1');
    await store.revoke('vm1', 2, 'm1');
    expect(await new OwnershipStore(dir).get('vm1')).toMatchObject({ epoch: 2, state: 'aborted', migrationId: 'm1' });
    await expect(store.commit('vm1', 2, 'm1')).rejects.toBeInstanceOf(OwnershipConflict);
    // A later migration may bring the VM here again; a stale revoke of the old one does not touch it.
    await store.recordIncoming('vm1', 2, 'm2');
    await store.revoke('vm1', 2, 'm1');
    expect(await store.get('vm1')).toMatchObject({ epoch: 2, state: 'incoming', migrationId: 'm2' });
  });

  it('a fence recorded before prepare refuses a late prepare of the same migration', async () => {
    await store.abortIncoming('vm1', 3, 'm1');
    await expect(store.recordIncoming('vm1', 3, 'm1')).rejects.toBeInstanceOf(OwnershipConflict);
    // another attempt may reuse the epoch the aborted one never ran
    await expect(store.recordIncoming('vm1', 3, 'm2')).resolves.toMatchObject({ state: 'incoming' });
  });

  it('refuses to receive a VM it runs, and older epochs', async () => {
    await store.claimNew('vm1');
    await expect(store.recordIncoming('vm1', 2, 'm1')).rejects.toThrow(/already holds VM vm1/);
    await store.release('vm1', 1, 'm0');
    await expect(store.recordIncoming('vm1', 1, 'm1')).rejects.toThrow(/not newer/);
    await expect(store.recordIncoming('vm1', 3, 'm1')).resolves.toMatchObject({ state: 'incoming', epoch: 3 });
  });

  it('a fence for a refused prepare leaves a VM this host runs itself untouched', async () => {
    await store.claimNew('vm1');
    await expect(store.recordIncoming('vm1', 2, 'm1')).rejects.toThrow(/already holds VM vm1/);
    await store.abortIncoming('vm1', 2, 'm1');
    expect(await store.get('vm1')).toMatchObject({ state: 'running', epoch: 1, migrationId: null });
  });

  it('is idempotent for retried transitions', async () => {
    await store.recordIncoming('vm1', 2, 'm1');
    await store.recordIncoming('vm1', 2, 'm1');
    await store.recordPrepared('vm1', 2, 'm1');
    await store.recordPrepared('vm1', 2, 'm1');
    await store.commit('vm1', 2, 'm1');
    await store.commit('vm1', 2, 'm1');
    expect((await store.get('vm1'))?.state).toBe('running');
  });

  it('serialises concurrent transitions: exactly one of commit and abort wins', async () => {
    await store.recordIncoming('vm1', 2, 'm1');
    await store.recordPrepared('vm1', 2, 'm1');
    const results = await Promise.allSettled([store.commit('vm1', 2, 'm1'), store.abortIncoming('vm1', 2, 'm1')]);
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
  });
});
