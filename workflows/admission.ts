// admission: a counting semaphore for one scope (the cluster, or one host). Migrations ask for a
// slot with a signal (sent by an activity with signal-with-start), wait for the grant signal, and
// release with a signal when they finish. Slots of runs that ended without releasing are reclaimed.
import {
  condition,
  continueAsNew,
  getExternalWorkflowHandle,
  patched,
  proxyActivities,
  setHandler,
  workflowInfo,
} from '@temporalio/workflow';
import type { ControlActivities } from '../activities/control';
import {
  admissionStateQuery,
  releaseSlotSignal,
  requestSlotSignal,
  slotGrantedSignal,
  type AdmissionState,
  type SlotHolder,
  type SlotRequest,
} from './definitions';

const { closedRuns } = proxyActivities<ControlActivities>({ startToCloseTimeout: '1 minute', retry: { maximumInterval: '30 seconds' } });

/** While someone waits and every slot is taken, check this often whether a holder's run has ended. */
const RECLAIM_INTERVAL = '15 seconds';
/**
 * A run continues as new past this many history events, long before Temporal's own suggestion
 * (4 Ki events or 4 MiB by default) and its hard limits (50 Ki events, 50 MiB): a busy scope's
 * history stays small, so its replay on a worker that lost its cache stays fast.
 */
export const ADMISSION_HISTORY_EVENTS = 2_000;

const same = (a: SlotHolder, b: SlotHolder) => a.workflowId === b.workflowId && a.runId === b.runId;

export async function admission(state: AdmissionState): Promise<void> {
  // Part of the state, so re-grants still owed when the run continues as new are made by the next one.
  const regrant = (state.regrant ??= []);
  setHandler(admissionStateQuery, () => state);
  setHandler(requestSlotSignal, (req) => {
    state.limit = req.limit;
    const held = state.holders.find((h) => same(h.holder, req.holder));
    if (held) {
      held.ticket = req.ticket;
      regrant.push(held);
    } else {
      state.waiting = state.waiting.filter((w) => !same(w.holder, req.holder));
      state.waiting.push(req);
    }
  });
  setHandler(releaseSlotSignal, (release) => {
    const released = (r: SlotRequest) => same(r.holder, release) && (release.ticket === undefined || r.ticket <= release.ticket);
    state.holders = state.holders.filter((h) => !released(h));
    state.waiting = state.waiting.filter((w) => !released(w));
  });

  while (!historyFull()) {
    await condition(() => regrant.length > 0 || canGrant() || starved(), RECLAIM_INTERVAL);
    // All grants of one wake-up as commands of one workflow task (runs from before the patch awaited each in turn).
    const together = patched('admission-parallel-grants');
    const granting: Promise<void>[] = [];
    const issue = async (req: SlotRequest) => {
      if (together) granting.push(grant(req));
      else await grant(req);
    };
    for (const req of regrant.splice(0)) await issue(req);
    while (canGrant()) {
      const next = state.waiting.shift()!;
      state.holders.push(next);
      await issue(next);
    }
    await Promise.all(granting);
    if (starved()) {
      const ended = await closedRuns(state.holders.map((h) => h.holder));
      state.holders = state.holders.filter((h) => !ended.some((e) => same(e, h.holder)));
    }
    if (state.holders.length === 0 && state.waiting.length === 0) return; // idle: the next request starts a fresh run
  }
  await continueAsNew<typeof admission>(state);

  function historyFull(): boolean {
    const info = workflowInfo();
    if (info.continueAsNewSuggested) return true;
    // Runs that began before this limit existed keep going as they did (their histories replay unchanged).
    return patched('admission-history-limit') && info.historyLength >= (state.historyLimit ?? ADMISSION_HISTORY_EVENTS);
  }
  function canGrant(): boolean {
    return state.waiting.length > 0 && state.holders.length < state.limit;
  }
  function starved(): boolean {
    return state.waiting.length > 0 && state.holders.length >= state.limit;
  }

  async function grant(req: SlotRequest): Promise<void> {
    try {
      await getExternalWorkflowHandle(req.holder.workflowId, req.holder.runId).signal(slotGrantedSignal, { scope: state.scope, ticket: req.ticket });
    } catch {
      // The run has ended: its slot is free again.
      state.holders = state.holders.filter((h) => !same(h.holder, req.holder));
    }
  }
}
