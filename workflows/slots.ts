// The migration's side of admission: ask for slots, wait for the grants, give them back.
import { condition, getExternalWorkflowHandle, patched, setHandler, workflowInfo } from '@temporalio/workflow';
import { CLUSTER_SCOPE, admissionWorkflowId, releaseSlotSignal, slotGrantedSignal, type SlotHolder } from './definitions';

export interface SlotWanted {
  scope: string;
  /** Ask through this: an activity on the host whose agent knows the limit. */
  request(ticket: number): Promise<void>;
}

/** The patch that gives slots back in one workflow task. */
const RELEASE_AT_ONCE = 'slots-release-at-once';

/** How long the fast path waits for every grant before it falls back to taking slots in order. */
const FAST_GRANT = '2 seconds';

export class Slots {
  private readonly granted = new Set<string>();
  /** Scopes asked for (held or waited for), with the ticket of the latest request; grants with another ticket are stale. */
  private readonly tickets = new Map<string, number>();
  private nextTicket = 1;
  private readonly self: SlotHolder;

  constructor() {
    const info = workflowInfo();
    this.self = { workflowId: info.workflowId, runId: info.runId };
    setHandler(slotGrantedSignal, ({ scope, ticket }) => {
      if (this.tickets.get(scope) === ticket) this.granted.add(scope);
    });
  }

  /**
   * Take every slot. Fast path: ask for all at once, and if every grant arrives within a moment, done.
   * Otherwise hold only a prefix of one global order (the cluster first, then hosts by name): give
   * back the rest and take them one by one, so two migrations can never wait for each other.
   * `onWait` is told each scope that is not granted at once.
   */
  async acquire(wanted: SlotWanted[], onWait: (scope: string) => void): Promise<void> {
    const ordered = acquisitionOrder(wanted.filter((w) => !this.tickets.has(w.scope)));
    await Promise.all(ordered.map((w) => this.ask(w)));
    if (await condition(() => ordered.every((w) => this.granted.has(w.scope)), FAST_GRANT)) return;

    const first = ordered.findIndex((w) => !this.granted.has(w.scope));
    const rest = ordered.slice(first + 1).map((w) => w.scope);
    await this.release((scope) => rest.includes(scope));
    for (const w of ordered.slice(first)) {
      if (!this.tickets.has(w.scope)) await this.ask(w);
      if (!this.granted.has(w.scope)) {
        onWait(w.scope);
        await condition(() => this.granted.has(w.scope));
      }
    }
  }

  private ask(w: SlotWanted): Promise<void> {
    const ticket = this.nextTicket++;
    this.tickets.set(w.scope, ticket); // from now on a release must reach the admission workflow
    return w.request(ticket);
  }

  /** Give back the slots (all, or those `which` selects); a waiting request is withdrawn too. */
  async release(which: (scope: string) => boolean = () => true): Promise<void> {
    const scopes = [...this.tickets.keys()].filter(which);
    const giveBack = async (scope: string): Promise<void> => {
      const ticket = this.tickets.get(scope);
      this.granted.delete(scope);
      this.tickets.delete(scope);
      await getExternalWorkflowHandle(admissionWorkflowId(scope, workflowInfo().taskQueue))
        .signal(releaseSlotSignal, { ...this.self, ticket })
        .catch(() => undefined); // the admission run has ended: nothing is held there
    };
    // All at once: one workflow task for every slot, not one each (histories from before, one by one).
    if (patched(RELEASE_AT_ONCE)) await Promise.all(scopes.map(giveBack));
    else for (const scope of scopes) await giveBack(scope);
  }
}

/** The one global order every migration takes slots in: the cluster first, then hosts by name. */
export function acquisitionOrder<T extends { scope: string }>(wanted: T[]): T[] {
  const rank = (scope: string) => (scope === CLUSTER_SCOPE ? 0 : 1);
  return [...wanted].sort((x, y) => rank(x.scope) - rank(y.scope) || (x.scope < y.scope ? -1 : x.scope > y.scope ? 1 : 0));
}
