// The error taxonomy of host steps (activities/failures.ts): each class of error, classified once.
import { classify, type StepContext } from '../../activities/failures';
import { DataPlaneError } from '../../dataplane/api';
import { HypervisorError } from '../../hypervisor/errors';
import { OwnershipConflict } from '../../migration/ownership';
import { DestinationUnreachable, FenceUnconfirmed, VmGone } from '../../migration/source';
import { formatRetry } from '../../common/migration';

const source: StepContext = { host: 'a', role: 'source', peer: 'b' };
const destination: StepContext = { host: 'b', role: 'destination', peer: null };

function errno(code: string, message: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: ${message}`), { code });
}

describe('classify', () => {
  it.each([
    ['ENOSPC', 'no space left on the filesystem', 'free space there'],
    ['EDQUOT', 'the disk quota is exhausted', 'raise the quota'],
    ['EROFS', 'the filesystem is read-only', 'remount it read-write'],
    ['EACCES', 'permission denied', "give the agent's user access"],
    ['EPERM', 'operation not permitted', "give the agent's user access"],
    ['EIO', 'an I/O error on the storage', 'check the disk'],
  ])('%s on this host is permanent, names the host, the cause and the fix, and is this host\'s problem', (code, what, fix) => {
    const c = classify(errno(code, 'write'), destination);
    expect(c).toMatchObject({ kind: 'permanent', type: code, blame: 'destination' });
    expect(c.message.startsWith(`host b: ${what} (${code}: write): ${fix}`)).toBe(true);
    expect(c.message).toMatch(/, or migrate to another destination$/);
  });

  it('an errno the destination sent back is the destination\'s, found in its message', () => {
    const c = classify(new DataPlaneError('remote', 'host b: ENOSPC: no space left on device, write (in /x, applying migration m)'), source);
    expect(c).toMatchObject({ kind: 'permanent', type: 'ENOSPC', blame: 'destination', message: expect.stringMatching(/^host b: no space left on the filesystem \(/) });
  });

  it('connections refused or reset, timeouts and an unreachable destination are transient', () => {
    for (const err of [errno('ECONNREFUSED', 'connect'), errno('ECONNRESET', 'read'), errno('ETIMEDOUT', 'x'), new DataPlaneError('disconnected', 'gone'), new DataPlaneError('connect_failed', 'no'), new HypervisorError('Timeout', 'slow'), new DestinationUnreachable('down')]) {
      expect(classify(err, source).kind).toBe('transient');
    }
    expect(classify(new FenceUnconfirmed('VM x is migrated here and stays so'), source)).toMatchObject({ kind: 'transient', blame: 'destination' });
  });

  it('a wrong data-plane secret is permanent, the destination\'s, and says what to do', () => {
    const c = classify(new DataPlaneError('auth_failed', 'the server at 1.2.3.4:7400 could not prove the shared secret (wrong secret on one side?)'), source);
    expect(c).toMatchObject({ kind: 'permanent', type: 'DataPlaneAuthFailed', blame: 'destination' });
    expect(c.message).toMatch(/^hosts a and b do not share the data-plane secret \(the server .* could not prove the shared secret .*\): give every agent the same --data-secret-file/);
  });

  it('the VM process gone and a hypervisor that refuses are permanent', () => {
    expect(classify(new VmGone('vm1', 'a', { code: null, signal: 'SIGKILL', at: 'T' }), source)).toMatchObject({ kind: 'permanent', type: 'VmCrashed', blame: 'source', message: expect.stringMatching(/killed by SIGKILL at T/) });
    for (const code of ['VmNotRunning', 'InvalidState', 'CommandNotFound', 'InvalidArgument']) {
      expect(classify(new HypervisorError(code, 'no'), source)).toMatchObject({ kind: 'permanent', type: code, blame: 'source' });
    }
    expect(classify(new OwnershipConflict('held', null), destination)).toMatchObject({ kind: 'permanent', type: 'OwnershipConflict', message: 'held' });
  });

  it('anything else is unknown: retried a few times, then permanent', () => {
    expect(classify(new Error('something odd'), source)).toMatchObject({ kind: 'unknown', type: 'UnexpectedError', message: 'something odd' });
    expect(classify(new DataPlaneError('remote', 'no machine-state stream x here'), source)).toMatchObject({ kind: 'unknown', blame: 'destination' });
  });
});

it('says "retrying: <cause> (attempt N, since T)"', () => {
  expect(formatRetry({ step: 'copyDiskDirty', cause: 'cannot open the data plane', attempt: 3, sinceMs: Date.UTC(2026, 0, 2, 3, 4, 5, 678) })).toBe(
    'retrying: cannot open the data plane (attempt 3, since 2026-01-02T03:04:05Z)',
  );
});
