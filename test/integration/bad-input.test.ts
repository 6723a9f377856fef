// Bad input on every public surface, end to end on real agents and VM processes: the migration
// workflow's input, the client's requests, the `ferry` CLI, the data plane and a VM's control socket.
// Every case is refused with an error that names the problem and the fix, and after every case the
// VM the input aimed at still runs on its host, in the same process, at the same ownership epoch,
// with nothing of it at the destination; its guest is checked against the reference run at the end.
// The data-plane server and the control socket are then fuzzed over their real sockets.
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { ApplicationFailure, WorkflowFailedError } from '@temporalio/client';
import { startCluster, testVm, uniqueHosts, expectGuestCorrect, waitForProgress } from '../support/cluster';
import { ferry as runFerry, inBatches } from '../support/cli';
import { RawPeer } from '../support/dataplane-peer';
import { controlExchange, errorReply } from '../support/control-peer';
import { FUZZ_SEED, boundedRun, mutated, randomBytes as randomInput, resealedFrames, spliced } from '../support/fuzz';
import type { LocalCluster } from '../../harness/cluster';
import {
  FerryRequestError,
  HostUnavailable,
  MigrationAlreadyRunning,
  MigrationNotFound,
  ValidationFailed,
  VmNotFound,
  type FerryClient,
  type MigrationHandle,
} from '../../client/ferry-client';
import type { MigrateVmInput } from '../../common/migration';
import { connect, DataPlaneError, type SessionIdentity } from '../../dataplane';
import { sessionTag } from '../../dataplane/auth';
import { encodeFrame, encodeMeta, FrameKind, HEADER_BYTES, PROTOCOL_VERSION, sealFrame, writeHeader } from '../../dataplane/frame';
import { Msg } from '../../migration/messages';
import { ControlClient } from '../../hypervisor/control/client';
import { encodeFrame as controlFrame } from '../../hypervisor/control/protocol';
import { setBandwidthSignal } from '../../workflows/definitions';

jest.setTimeout(300_000);

const [A, B] = uniqueHosts('a', 'b');
let cluster: LocalCluster;
let ferry: FerryClient;

/** The VM every bad input aims at, on A. */
const vm = testVm('randwrite', { opsPerSecond: 200 });
/** A VM id that exists on both hosts, as two different VMs. */
const held = testVm('idle', { fill: false });
let baseline: { pid: number; ops: number };
/** Set by the last test, whose guest check halts the VM. */
let checkedAtTheEnd = false;

beforeAll(async () => {
  ({ cluster, ferry } = await startCluster([A, B]));
  await ferry.hostCommand(A, 'vmCreate', vm);
  await ferry.hostCommand(A, 'vmCreate', held);
  await ferry.hostCommand(B, 'vmCreate', held);
  const s = await ferry.hostCommand(A, 'vmInspect', { vmId: vm.vmId });
  baseline = { pid: s.pid!, ops: s.guest!.ops };
});

afterAll(async () => {
  await cluster?.stop();
});

/** Files under a host's home that belong to a VM (its directory, incoming records, bases...). */
async function filesOf(host: string, vmId: string): Promise<string[]> {
  const home = cluster.home(host);
  const all = (await fs.readdir(home, { recursive: true })) as string[];
  const out: string[] = [];
  for (const f of all.filter((p) => p.includes(vmId))) {
    // A rolled-back attempt leaves a fence (ownership "aborted"): a record that it can never run there.
    if (f === path.join('ownership', `${vmId}.json`) && JSON.parse(await fs.readFile(path.join(home, f), 'utf8')).state === 'aborted') continue;
    out.push(f);
  }
  return out;
}

/** Nothing changed: the VM runs on A in the same process at epoch 1, still advancing, and B holds nothing of it. */
async function expectUnchanged(): Promise<void> {
  if (checkedAtTheEnd) return;
  const s = await ferry.hostCommand(A, 'vmInspect', { vmId: vm.vmId });
  expect(s).toMatchObject({ state: 'running', pid: baseline.pid, guest: { violations: 0 }, ownership: { state: 'running', epoch: 1 } });
  expect(s.guest!.ops).toBeGreaterThanOrEqual(baseline.ops);
  baseline.ops = s.guest!.ops;
  expect(await filesOf(B, vm.vmId)).toEqual([]);
  expect((await cluster.vmProcesses(B)).map((p) => p.vmId)).not.toContain(vm.vmId);
}

afterEach(expectUnchanged);

/** The innermost failure of a Temporal error chain. */
function rootCause(err: unknown): unknown {
  let cur = err;
  while (cur instanceof Error && cur.cause instanceof Error) cur = cur.cause;
  return cur;
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  return p.then(
    () => {
      throw new Error('the bad input was accepted');
    },
    (e: unknown) => e as Error,
  );
}

/** Starts a migration of `vm` A→B with `change` applied; it must fail, non-retryably, at its root. */
async function refusedMigration(change: Record<string, unknown>): Promise<FerryRequestError> {
  const input = { vmId: vm.vmId, sourceHost: A, destinationHosts: [B], ...change } as MigrateVmInput;
  const handle = await ferry.migrate(input, { checkHosts: false });
  const err = await rejection(handle.result());
  const raw = await rejection(handle.workflow.result());
  expect(raw).toBeInstanceOf(WorkflowFailedError);
  const root = rootCause(raw);
  expect(root).toBeInstanceOf(ApplicationFailure);
  expect((root as ApplicationFailure).nonRetryable).toBe(true);
  expect(err).toBeInstanceOf(FerryRequestError);
  expect((err as FerryRequestError).refused).toBe(true);
  return err as FerryRequestError;
}

/** A well-formed HELLO frame (no secret needed to write one). */
function hello(identity: SessionIdentity, version = PROTOCOL_VERSION): Buffer {
  const meta = { version, identity, clientNonce: randomBytes(32).toString('hex'), sessionId: randomBytes(8).toString('hex'), lastAckedSeq: 0 };
  return Buffer.concat(encodeFrame({ kind: FrameKind.HELLO, tag: sessionTag(identity), seq: 0, meta: encodeMeta(meta) }));
}

describe('workflow input (FerryClient.migrate): the workflow fails at once with a non-retryable, typed refusal', () => {
  it.each<[string, Record<string, unknown>, typeof FerryRequestError, RegExp]>([
    ['an unknown VM', { vmId: 'no-such-vm' }, VmNotFound, /VM no-such-vm does not exist on host a-\w+: check the VM id and the source host \(ferry vm list\)/],
    ['a VM that is not on the named source', { sourceHost: B, destinationHosts: [A] }, VmNotFound, /VM vm-\S+ does not exist on host b-\w+: check the VM id and the source host/],
    ['the same source and destination', { destinationHosts: [A] }, ValidationFailed, /a VM cannot migrate to the host it runs on; name another destination/],
    ['a negative bandwidth', { bandwidthBytesPerSecond: -1 }, ValidationFailed, /bandwidthBytesPerSecond must be a positive number of bytes per second, or null for unlimited \(got -1\)/],
    ['a zero downtime target', { downtimeTargetMs: 0 }, ValidationFailed, /downtimeTargetMs must be a number >= 1 \(got 0\)/],
    ['a non-integer block size', { blockBytes: 65536.5 }, ValidationFailed, /blockBytes must be an integer >= 4096 \(got 65536\.5\)/],
    ['a block size that is not a power of two', { blockBytes: 100_000 }, ValidationFailed, /blockBytes must be a power of two between 4096 and 1048576 \(got 100000\)/],
    ['a number sent as a string', { destinationDeadlineSeconds: '60' }, ValidationFailed, /destinationDeadlineSeconds must be a number >= 1 \(got "60"\)/],
    ['an unknown mode', { mode: 'warp' }, ValidationFailed, /mode must be one of tpm, precopy \(got "warp"\)/],
    ['an unknown incremental policy', { incremental: 'sometimes' }, ValidationFailed, /incremental must be one of auto, off, require \(got "sometimes"\)/],
    ['a misspelt field', { bandwith: 1e6 }, ValidationFailed, /the input has unknown field "bandwith": the fields are vmId, sourceHost, destinationHosts, mode/],
    ['a malformed VM id', { vmId: '../etc' }, ValidationFailed, /vmId "\.\.\/etc" is not a valid VM id: use 1-63 of a-z, 0-9/],
    ['a malformed destination name', { destinationHosts: ['b b'] }, ValidationFailed, /destination "b b" is not a valid host name/],
  ])('refuses %s', async (_name, change, type, message) => {
    const err = await refusedMigration(change);
    expect(err).toBeInstanceOf(type);
    expect(err.message).toMatch(message);
  });
});

describe('client requests: refused before anything starts', () => {
  it('refuses an unknown source host and an unknown destination host (no agent polls them)', async () => {
    for (const input of [{ sourceHost: 'nowhere', destinationHosts: [B] }, { sourceHost: A, destinationHosts: ['nowhere'] }]) {
      const err = await rejection(ferry.migrate({ vmId: vm.vmId, ...input }));
      expect(err).toBeInstanceOf(HostUnavailable);
      expect(err.message).toBe('no agent is polling task queue host-nowhere: start `ferry worker --host nowhere` (or check the host name)');
    }
  });

  it('refuses abort and approve when no migration of the VM runs', async () => {
    for (const vmId of [`never-migrated-${A}`, vm.vmId]) {
      const handle = ferry.getMigration(vmId);
      for (const request of [() => handle.abort('why not'), () => handle.approveCutover()]) {
        const err = await rejection(request());
        expect(err).toBeInstanceOf(MigrationNotFound);
        expect(err.message).toBe(`no running migration of VM ${vmId}: it has ended or never started (ferry status ${vmId})`);
      }
    }
  });

  it('refuses a live bandwidth that is not a positive number', async () => {
    for (const bps of [0, -5, NaN, Infinity]) {
      const err = await rejection(ferry.getMigration(vm.vmId).setBandwidth(bps));
      expect(err).toBeInstanceOf(ValidationFailed);
      expect(err.message).toMatch(/bandwidthBytesPerSecond must be a positive number of bytes per second, or null for unlimited/);
    }
  });
});

describe('a destination that cannot take the VM: rolled back with the reason, both hosts as they were', () => {
  it('refuses a destination that already runs a VM of that id', async () => {
    const before = await Promise.all([A, B].map((h) => ferry.hostCommand(h, 'vmInspect', { vmId: held.vmId })));
    const report = await (await ferry.migrate({ vmId: held.vmId, sourceHost: A, destinationHosts: [B] })).result();
    expect(report).toMatchObject({ outcome: 'rolled-back', destinationHost: null });
    expect(report.failedDestinations).toEqual([
      { host: B, reason: `host already holds VM ${held.vmId} (running at epoch 1); it cannot receive epoch 2` },
    ]);
    const after = await Promise.all([A, B].map((h) => ferry.hostCommand(h, 'vmInspect', { vmId: held.vmId })));
    for (const [i, s] of after.entries()) {
      expect(s).toMatchObject({ state: 'running', pid: before[i].pid, ownership: { state: 'running', epoch: 1, migrationId: null } });
    }
  });

  it('refuses incremental: require when the destination holds no base of the VM', async () => {
    const report = await (await ferry.migrate({ vmId: vm.vmId, sourceHost: A, destinationHosts: [B], incremental: 'require' })).result();
    expect(report).toMatchObject({ outcome: 'rolled-back', destinationHost: null });
    expect(report.failedDestinations[0].reason).toMatch(/incremental migration required but not possible: the source has no write-tracking bitmap for VM/);
  });
});

describe('the ferry CLI: usage errors exit 2, refusals exit 4, with one line that names the fix', () => {
  it('refuses bad flags, arguments and agent settings', async () => {
    const cases: [string, string[], Record<string, string | undefined>, number, RegExp][] = [
      ['an unknown flag', ['migrate', vm.vmId, '--from', A, '--to', B, '--frobnicate'], {}, 2, /^ferry: unknown option '--frobnicate'\n\(see: ferry migrate --help\)/],
      ['a missing --to', ['migrate', vm.vmId, '--from', A], {}, 2, /^ferry: required option '--to <host\[,host...\]>' not specified/],
      ['a bad unit', ['migrate', vm.vmId, '--from', A, '--to', B, '--block-size', '10 XB'], {}, 2, /argument '10 XB' is invalid\. expected a size such as 1GiB, 256MiB or 4096/],
      ['a malformed VM id', ['migrate', 'VM 1', '--from', A, '--to', B], {}, 2, /invalid VM id "VM 1": use 1-63 characters of a-z, 0-9/],
      ['a malformed source host', ['migrate', vm.vmId, '--from', 'A!', '--to', B], {}, 2, /option '--from <host>' argument 'A!' is invalid\. invalid host name "A!"/],
      ['a zero rate', ['bandwidth', vm.vmId, '0'], {}, 2, /0 is not a positive rate \(use "unlimited" for no limit\)/],
      ['a negative count', ['list', '--limit', '-3'], {}, 2, /--limit.*must be a whole number >= 1/],
      ['more memory than the host has', ['vm', 'create', `${vm.vmId}-big`, '--host', A, '--disk', '1MiB', '--memory', '64TiB', '--workload', 'idle'], {}, 4, /memoryBytes 70368744177664 is more than this host can give one VM \(\d+ bytes\): use less memory or another host/],
      ['an agent without a secret', ['worker', '--host', 'x'], { FERRY_DATA_SECRET: undefined, FERRY_DATA_SECRET_FILE: undefined }, 2, /^ferry worker: no data-plane secret: set FERRY_DATA_SECRET/],
      ['an agent with a bad listen address', ['worker', '--host', 'x', '--data-listen', 'localhost'], { FERRY_DATA_SECRET: 's' }, 2, /--data-listen localhost: expected HOST:PORT, for example 127\.0\.0\.1:7400/],
    ];
    const runs = await inBatches(cases, ([, args, env]) => runFerry(args, env), 4);
    runs.forEach((run, i) => {
      const [name, , , code, message] = cases[i];
      expect({ name, code: run.code, stderr: run.stderr }).toEqual({ name, code, stderr: expect.stringMatching(message) });
    });
    expect(await filesOf(A, `${vm.vmId}-big`)).toEqual([]);
  });
});

describe("the data plane (agent B's server, raw TCP): refused with an ERROR frame, nothing applied", () => {
  const secret = (): Buffer => Buffer.from(cluster.secret);
  const address = (): string => cluster.agents.get(B)!.dataAddress;
  const foreign: SessionIdentity = { migrationId: 'migrate-nothing-here', epoch: 2, vmId: vm.vmId, stream: 'disk' };

  /** Sends `bytes`, and returns the ERROR the server answers with before it closes the connection. */
  async function refusal(bytes: Buffer): Promise<{ code: string; message: string }> {
    const peer = RawPeer.to(address());
    try {
      peer.sendRaw(bytes);
      const err = await peer.next(FrameKind.ERROR);
      await peer.waitClosed();
      return err.meta as { code: string; message: string };
    } finally {
      peer.destroy();
    }
  }

  it.each<[string, () => Buffer, string, RegExp]>([
    ['something that is not Ferry (HTTP)', () => Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), 'bad_magic', /not a Ferry data-plane frame \(bad magic\)/],
    ['another protocol version in the header', () => Object.assign(hello(foreign), { 4: 2 }), 'bad_version', /unsupported protocol version 2 \(this side speaks 1\)/],
    ['another protocol version in HELLO', () => hello(foreign, 7), 'bad_version', /unsupported protocol version 7 \(this side speaks 1\)/],
    [
      'a length field of 1 GiB (with a valid header checksum)',
      () => {
        const head = Buffer.alloc(HEADER_BYTES);
        writeHeader(head, { kind: FrameKind.HELLO, flags: 0, tag: 0, seq: 0, type: 0, metaLength: 1 << 30, dataLength: 0 });
        sealFrame(head);
        return head;
      },
      'too_large',
      /meta length 1073741824 exceeds 4096/,
    ],
    ['a corrupt checksum', () => Object.assign(hello(foreign), { [HEADER_BYTES + 5]: 0x21 }), 'bad_checksum', /frame checksum mismatch/],
    ['a frame kind other than HELLO first', () => Buffer.concat(encodeFrame({ kind: FrameKind.MSG, tag: 0, seq: 1, type: Msg.Block })), 'protocol', /expected HELLO, got frame kind 5/],
    ['a malformed HELLO', () => Buffer.concat(encodeFrame({ kind: FrameKind.HELLO, tag: 0, seq: 0, meta: encodeMeta({ version: 1 }) })), 'protocol', /invalid sessionId/],
  ])('refuses %s', async (_name, bytes, code, message) => {
    const err = await refusal(bytes());
    expect(err.code).toBe(code);
    expect(err.message).toMatch(message);
  });

  it('refuses a wrong secret (both ways)', async () => {
    const err = await rejection(connect({ address: address(), secret: randomBytes(24), identity: foreign, reconnectTimeoutMs: 0 }));
    expect(err).toBeInstanceOf(DataPlaneError);
    expect(err).toMatchObject({ code: 'auth_failed', message: expect.stringMatching(/could not prove the shared secret \(wrong secret on one side\?\)/) });
    const peer = RawPeer.to(address());
    const answer = await peer.handshake(foreign, randomBytes(24));
    peer.destroy();
    expect(answer).toMatchObject({ kind: FrameKind.ERROR, meta: { code: 'auth_failed', message: 'authentication failed' } });
  });

  it('refuses a session for a migration this host does not expect', async () => {
    const err = await rejection(connect({ address: address(), secret: secret(), identity: foreign, reconnectTimeoutMs: 0 }));
    expect(err).toMatchObject({ code: 'refused', message: 'no incoming migration migrate-nothing-here on this host' });
  });

  it('refuses identity names that could reach other files on the host', async () => {
    // Authenticated: only the name is wrong. ../ownership/<vm> names a real JSON file on B.
    const peer = RawPeer.to(address());
    const answer = await peer.handshake({ migrationId: `../ownership/${held.vmId}`, epoch: 1, vmId: held.vmId, stream: 'disk' }, secret());
    peer.destroy();
    expect(answer).toMatchObject({ kind: FrameKind.ERROR, meta: { code: 'protocol', message: expect.stringMatching(/invalid migrationId: use 1-256 characters of A-Z, a-z, 0-9/) } });
  });

  it('answers nothing to a truncated frame, and serves the next connection', async () => {
    const peer = RawPeer.to(address());
    const bytes = hello(foreign);
    peer.sendRaw(bytes.subarray(0, bytes.length - 7));
    peer.socket.end();
    await peer.waitClosed();
    expect(peer.frames).toEqual([]);
    const err = await rejection(connect({ address: address(), secret: secret(), identity: foreign, reconnectTimeoutMs: 0 }));
    expect(err).toMatchObject({ code: 'refused' });
  });
});

describe('while a migration runs: bad input aimed at it changes nothing', () => {
  const busy = testVm('randwrite', { opsPerSecond: 200 });
  let handle: MigrationHandle;
  let identity: SessionIdentity;

  beforeAll(async () => {
    await ferry.hostCommand(A, 'vmCreate', busy);
    handle = await ferry.migrate({ vmId: busy.vmId, sourceHost: A, destinationHosts: [B], cutover: 'manual' });
    await waitForProgress(handle, 'awaiting-cutover', (p) => p.phase === 'awaiting-cutover');
    const desc = await handle.workflow.describe();
    identity = { migrationId: `${desc.workflowId}-${desc.runId}`, epoch: 2, vmId: busy.vmId, stream: 'probe' };
  });

  it('refuses a second migration of the VM', async () => {
    const err = await rejection(ferry.migrate({ vmId: busy.vmId, sourceHost: A, destinationHosts: [B] }));
    expect(err).toBeInstanceOf(MigrationAlreadyRunning);
    expect(err.message).toMatch(/is already migrating .*: wait for it \(ferry status \S+ --follow\) or abort it \(ferry abort \S+\)/);
  });

  it('drops an invalid bandwidth that reaches the workflow as a raw signal', async () => {
    await handle.workflow.signal(setBandwidthSignal, -5);
    await handle.workflow.signal(setBandwidthSignal, 'fast' as unknown as number);
    // A round runs every 5 s while awaiting the cutover: had a value been applied, the source's
    // sessions would fail to open and its activities retry.
    await new Promise((r) => setTimeout(r, 7000));
    const pending = (await handle.workflow.describe()).raw.pendingActivities ?? [];
    expect(pending.filter((a) => (a.attempt ?? 1) > 1).map((a) => [a.activityType?.name, a.lastFailure?.message])).toEqual([]);
    expect((await handle.progress()).phase).toBe('awaiting-cutover');
  });

  it('refuses data-plane sessions for an older or newer epoch, or another VM', async () => {
    const session = await connect({ address: cluster.agents.get(B)!.dataAddress, secret: Buffer.from(cluster.secret), identity, reconnectTimeoutMs: 0 });
    await session.close();
    for (const other of [{ ...identity, epoch: 1 }, { ...identity, epoch: 3 }, { ...identity, vmId: vm.vmId }]) {
      const err = await rejection(connect({ address: cluster.agents.get(B)!.dataAddress, secret: Buffer.from(cluster.secret), identity: other, reconnectTimeoutMs: 0 }));
      expect(err).toMatchObject({
        code: 'refused',
        message: `migration ${identity.migrationId} expects VM ${busy.vmId} epoch 2, not ${other.vmId} epoch ${other.epoch}`,
      });
    }
  });

  it('refuses, on an authenticated session of the migration, an unknown message type and blocks outside the disk', async () => {
    const session = await connect({ address: cluster.agents.get(B)!.dataAddress, secret: Buffer.from(cluster.secret), identity, reconnectTimeoutMs: 0 });
    try {
      const blocks = busy.diskBytes / 65536;
      const cases: [number, Record<string, unknown>, Buffer, RegExp][] = [
        [99, {}, Buffer.alloc(0), /^unknown message type 99$/],
        [Msg.Block, { b: blocks }, Buffer.alloc(65536, 1), new RegExp(`block ${blocks} is not a block of VM ${busy.vmId}'s disk \\(0\\.\\.${blocks - 1} at 65536 bytes\\)`)],
        [Msg.Block, { b: -1 }, Buffer.alloc(65536, 1), /block -1 is not a block of VM/],
        [Msg.Block, { b: '3' }, Buffer.alloc(65536, 1), /block "3" is not a block of VM/],
        [Msg.Block, { b: 3 }, Buffer.alloc(65536 + 100, 1), new RegExp(`blocks from 3 of VM ${busy.vmId}: the message carries 65636 bytes, not whole 65536-byte blocks`)],
        [Msg.Block, { b: blocks - 1 }, Buffer.alloc(2 * 65536, 1), /the message carries 131072 bytes, not whole 65536-byte blocks inside the disk/],
      ];
      for (const [type, meta, data, message] of cases) {
        const err = await rejection(session.request({ type, meta, data }));
        expect(err).toMatchObject({ code: 'remote', message: expect.stringMatching(message) });
      }
    } finally {
      await session.close();
    }
  });

  it(`survives ~4 s of random and mutated data-plane input (fast-check, seed ${FUZZ_SEED}), then serves the migration`, async () => {
    const valid = [hello(identity), hello({ ...identity, stream: 'disk' }), Buffer.concat(encodeFrame({ kind: FrameKind.AUTH, tag: sessionTag(identity), seq: 0, meta: encodeMeta({ proof: 'ab'.repeat(32) }) }))];
    const input = fc.oneof(randomInput, mutated(valid), resealedFrames(valid), spliced(fc.oneof(fc.constantFrom(...valid), mutated(valid))));
    let runs = 0;
    await fc.assert(
      fc.asyncProperty(input, async (bytes) => {
        runs++;
        const peer = RawPeer.to(cluster.agents.get(B)!.dataAddress);
        peer.sendRaw(bytes);
        peer.socket.end();
        const closed = await Promise.race([peer.waitClosed().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 10_000))]);
        peer.destroy();
        expect(closed).toBe(true); // answered or closed: never left hanging
      }),
      boundedRun(4000),
    );
    expect(runs).toBeGreaterThanOrEqual(30);
    expect(cluster.agents.get(B)!.process.exitCode).toBeNull();
    // A well-behaved client of the same migration is served.
    const session = await connect({ address: cluster.agents.get(B)!.dataAddress, secret: Buffer.from(cluster.secret), identity, reconnectTimeoutMs: 0 });
    const reply = await session.request({ type: Msg.Query, meta: {}, data: Buffer.alloc(0) });
    await session.close();
    expect(reply.meta).toMatchObject({ state: 'incoming', epoch: 2 });
  });

  it('then completes when approved, with the guest correct on the destination', async () => {
    await handle.approveCutover();
    expect(await handle.result()).toMatchObject({ outcome: 'completed', destinationHost: B, epoch: 2 });
    await expectGuestCorrect(ferry, B, busy);
  });
});

describe("a VM's control socket (the real VM process): error replies, and the VM runs on", () => {
  const socket = (): string => path.join(cluster.home(A), 'vms', vm.vmId, 'control.sock');

  it.each<[string, (Buffer | string)[], unknown, string, RegExp]>([
    ['malformed JSON', ['{"execute": "query-status", "id": \n'], null, 'ParseError', /^invalid JSON \(.*\): send one JSON object per line$/],
    ['a line that is not an object', ['[1,2,3]\n'], null, 'ParseError', /^each line must be a JSON object$/],
    ['no command name', ['{"id":1}\n'], 1, 'ParseError', /a command needs "execute": "<command name>" \(see query-commands\)/],
    ['an unknown command', ['{"execute":"format-disk","id":2}\n'], 2, 'CommandNotFound', /unknown command "format-disk": run query-commands for the list/],
    ['arguments that are not an object', ['{"execute":"bitmap-snapshot","arguments":[0,1],"id":3}\n'], 3, 'InvalidArgument', /"arguments" must be a JSON object/],
    ['an argument of the wrong type', ['{"execute":"run-until","arguments":{"ops":"many"},"id":4}\n'], 4, 'InvalidArgument', /argument "ops" must be an integer from 0 to \d+, got "many"/],
    ['a downtime limit out of range', ['{"execute":"migrate","arguments":{"uri":"unix:/nonexistent","downtimeLimitMs":-5},"id":5}\n'], 5, 'InvalidArgument', /argument "downtimeLimitMs" must be an integer from 0 to 3600000, got -5/],
    ['a block index outside the disk', ['{"execute":"deliver-blocks","arguments":{"blockBytes":65536,"items":[{"block":512,"length":65536}]},"id":6,"attachment":65536}\n', Buffer.alloc(65536)], 6, 'InvalidArgument', /argument "block" must be an integer from 0 to 511, got 512/],
    ['a command the VM state does not allow', controlFrame({ execute: 'set-stale', arguments: { blockBytes: 65536 }, id: 7 }, Buffer.alloc(64)), 7, 'InvalidState', /set-stale is not allowed while the VM is running/],
    ['a negative attachment length', ['{"execute":"set-stale","attachment":-1,"id":8}\n'], 8, 'ParseError', /"attachment" must be the byte length of the data that follows \(an integer >= 0\), got -1/],
    ['an attachment over the limit', [`{"execute":"set-stale","attachment":${2 ** 40},"id":9}\n`], 9, 'AttachmentTooLarge', /attachment of 1099511627776 bytes exceeds the limit of 67108864: split the data over several commands/],
    ['a line over 1 MiB', [`{"execute":"query-status","pad":"${'x'.repeat(1 << 20)}"}\n`], null, 'LineTooLong', /a JSON line may be at most 1048576 bytes: send large data as an attachment/],
  ])('refuses %s', async (_name, input, id, errorClass, desc) => {
    const { replies, closed } = await controlExchange(socket(), input);
    expect(closed).toBe(true);
    expect(replies[0]).toMatchObject({ 'ferry-vm': { vmId: vm.vmId, pid: baseline.pid } });
    expect(errorReply(replies, id)).toEqual({ class: errorClass, desc: expect.stringMatching(desc) });
  });

  it(`survives ~4 s of random and mutated command lines (fast-check, seed ${FUZZ_SEED}), then serves a client`, async () => {
    // Only commands that change nothing on a running VM are mutated (a mutation must not turn one into "quit").
    const valid = [
      controlFrame({ execute: 'query-status', id: 1 }),
      controlFrame({ execute: 'query-migrate', id: 2 }),
      controlFrame({ execute: 'set-stale', arguments: { blockBytes: 65536 }, id: 3 }, Buffer.alloc(64, 7)),
      controlFrame({ execute: 'wait-heartbeat', arguments: { since: 0, timeoutMs: 1 }, id: 4 }),
      controlFrame({ execute: 'query-stale', id: 5 }),
    ].map((parts) => Buffer.concat(parts));
    const lines = fc.jsonValue({ maxDepth: 3 }).map((v) => Buffer.from(`${JSON.stringify(v)}\n`));
    const input = fc.oneof(randomInput, mutated(valid), lines, spliced(fc.oneof(fc.constantFrom(...valid), mutated(valid), lines)));
    let runs = 0;
    await fc.assert(
      fc.asyncProperty(input, async (bytes) => {
        runs++;
        const { replies, closed } = await controlExchange(socket(), [bytes]);
        expect(closed).toBe(true);
        expect(replies[0]).toMatchObject({ 'ferry-vm': { pid: baseline.pid } });
        for (const r of replies.slice(1)) expect(r.error === undefined || typeof (r.error as { desc: unknown }).desc === 'string').toBe(true);
      }),
      boundedRun(4000),
    );
    expect(runs).toBeGreaterThanOrEqual(30);
    const client = await ControlClient.connect(socket(), { expectVmId: vm.vmId });
    const status = await client.request('query-status');
    client.close();
    expect(status.ret).toMatchObject({ vmId: vm.vmId, state: 'running', pid: baseline.pid, guest: { violations: 0 } });
  });
});

describe('the VM every bad input aimed at', () => {
  it('ran on through all of it, and its guest equals the reference run', async () => {
    await new Promise((r) => setTimeout(r, 300));
    const s = await ferry.hostCommand(A, 'vmInspect', { vmId: vm.vmId });
    expect(s.guest!.ops).toBeGreaterThan(baseline.ops);
    checkedAtTheEnd = true;
    await expectGuestCorrect(ferry, A, vm);
  });
});
