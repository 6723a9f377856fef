// The error taxonomy of host steps (activities/failures.ts): each class of error, classified once.
import pino from 'pino';
import { ApplicationFailure } from '@temporalio/common';
import { UNKNOWN_ERROR_ATTEMPTS, classify, failureInterceptor, type StepContext } from '../../activities/failures';
import { DataPlaneError } from '../../dataplane/api';
import { HypervisorError } from '../../hypervisor/errors';
import { OwnershipConflict } from '../../migration/ownership';
import { DestinationUnreachable, FenceUnconfirmed, VmGone } from '../../migration/source';
import { formatRetry, type RetryState, type StepFailure } from '../../common/migration';

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

describe('the activity boundary', () => {
  const log = pino({ level: 'silent' });
  type Ctx = Parameters<ReturnType<typeof failureInterceptor>>[0];

  /** Runs one attempt of a migration step that throws `err`, as the worker would; returns what Temporal gets and the signals sent. */
  async function attempt(err: Error, n: number, signals: unknown[], activityType = 'copyDiskDirty'): Promise<ApplicationFailure> {
    const ctx = {
      info: { attempt: n, activityType, activityId: '7', workflowType: 'migrateVm', workflowExecution: { workflowId: 'migrate-vm1', runId: 'r1' } },
      cancellationSignal: new AbortController().signal,
      client: { workflow: { getHandle: () => ({ signal: async (_def: unknown, arg: unknown) => void signals.push(arg) }) } },
    } as unknown as Ctx;
    const interceptors = boundary(ctx);
    const thrown = await interceptors.inbound!.execute!({ args: [{ ref: { destinationHost: 'b' } }], headers: {} }, async () => {
      throw err;
    }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(thrown).toBeInstanceOf(ApplicationFailure);
    return thrown as ApplicationFailure;
  }
  const boundary = failureInterceptor({ host: 'a', log });

  it('retries an unknown error a bounded number of times, then gives up with the host named', async () => {
    const signals: unknown[] = [];
    for (let n = 1; n < UNKNOWN_ERROR_ATTEMPTS; n++) {
      const f = await attempt(new Error('something odd'), n, signals);
      expect(f).toMatchObject({ nonRetryable: false, type: 'UnexpectedError', message: 'something odd' });
      expect((f.details?.[0] as StepFailure).retry).toMatchObject({ step: 'copyDiskDirty', cause: 'something odd', attempt: n, sinceMs: expect.any(Number) });
    }
    const last = await attempt(new Error('something odd'), UNKNOWN_ERROR_ATTEMPTS, signals);
    expect(last).toMatchObject({ nonRetryable: true, type: 'UnexpectedError', message: `something odd (failed ${UNKNOWN_ERROR_ATTEMPTS} times with an error Ferry does not know: see the log of host a)` });
    // The workflow hears of attempts 1, 2 and 4 (then 8, 16...): its progress says so without one signal per attempt.
    expect(signals.map((s) => (s as RetryState).attempt)).toEqual([1, 2, 4]);
  });

  it('keeps "since" across the attempts of one step', async () => {
    const first = await attempt(errno('ECONNRESET', 'read'), 1, [], 'switchover');
    await new Promise((r) => setTimeout(r, 20));
    const second = await attempt(errno('ECONNRESET', 'read'), 2, [], 'switchover');
    expect((second.details?.[0] as StepFailure).retry!.sinceMs).toBe((first.details?.[0] as StepFailure).retry!.sinceMs);
  });

  it('a permanent error is not retried and says whose problem it is', async () => {
    const f = await attempt(new DataPlaneError('auth_failed', 'the server could not prove the shared secret'), 1, []);
    expect(f).toMatchObject({ nonRetryable: true, type: 'DataPlaneAuthFailed' });
    expect(f.details?.[0]).toEqual({ host: 'a', blame: 'destination' });
  });
});
