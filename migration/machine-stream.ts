// The source's end of a machine-state stream: the hypervisor's bytes carried to the destination over
// a data-plane session, one State message per chunk, in order. One stream per migration at a time,
// kept by the agent (a retried switchover activity joins the stream that runs). A stream that breaks
// is not resumed: the next attempt starts a new one (and the destination a fresh incoming VM), as
// QEMU's precopy cannot resume either.
import { randomBytes } from 'node:crypto';
import type { DataPlaneSession } from '../dataplane/api';
import type { OutgoingStream, StreamLimits, StreamProgress } from '../hypervisor/driver';
import { Msg, MIGRATION_PROTOCOL } from './messages';

export class CarriedStream {
  /** Bytes the data plane took so far. */
  carriedBytes = 0;
  /** Bytes an activity already reported to the workflow (the next one reports only what came after). */
  reportedBytes = 0;
  private error: Error | null = null;
  /** Resolves when every chunk went onto the data plane; rejects on the first failure. */
  readonly pumped: Promise<void>;
  readonly failed: Promise<never>;
  private fail!: (err: Error) => void;

  private constructor(
    readonly id: string,
    readonly session: DataPlaneSession,
    readonly stream: OutgoingStream,
  ) {
    this.failed = new Promise<never>((_, reject) => (this.fail = reject));
    this.failed.catch(() => undefined);
    this.pumped = this.pump();
    this.pumped.catch((err: Error) => this.broke(err));
    stream.completed.catch((err: Error) => this.broke(err));
  }

  /** Asks the destination for a fresh incoming VM, then starts the hypervisor's stream into it. */
  static async start(session: DataPlaneSession, migrateOut: () => Promise<OutgoingStream>): Promise<CarriedStream> {
    const id = randomBytes(8).toString('hex');
    await session.request({ type: Msg.StreamStart, meta: { stream: id, protocol: MIGRATION_PROTOCOL }, data: Buffer.alloc(0) });
    return new CarriedStream(id, session, await migrateOut());
  }

  get broken(): Error | null {
    return this.error;
  }

  /** Bytes carried since the last call (for activity results that add up to the report's total). */
  takeUnreported(): number {
    const n = this.carriedBytes - this.reportedBytes;
    this.reportedBytes = this.carriedBytes;
    return n;
  }

  progress(): Promise<StreamProgress> {
    return this.stream.progress();
  }

  setLimits(limits: Partial<StreamLimits>): Promise<void> {
    return this.stream.setLimits(limits);
  }

  /** Resolves when the hypervisor paused the guest for the switchover; rejects when the stream broke. */
  ready(): Promise<void> {
    return Promise.race([this.stream.ready, this.failed]);
  }

  /** After continue(): everything the hypervisor sent is applied at the destination. */
  async drained(): Promise<StreamProgress> {
    const done = await Promise.race([this.stream.completed, this.failed]);
    await Promise.race([this.pumped, this.failed]);
    await this.session.flush();
    return done;
  }

  async cancel(): Promise<void> {
    this.broke(new Error('the stream was cancelled'));
    await this.stream.cancel().catch(() => undefined);
    await this.stream.completed.catch(() => undefined);
  }

  private broke(err: Error): void {
    if (this.error) return;
    this.error = err;
    this.fail(err);
  }

  private async pump(): Promise<void> {
    let seq = 0;
    for await (const chunk of this.stream.chunks) {
      await this.session.send({ type: Msg.State, meta: { stream: this.id, seq: seq++ }, data: chunk });
      this.carriedBytes += chunk.length;
    }
  }
}
