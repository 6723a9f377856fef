// A migration with no data to move, for the admission load test: it takes its slots exactly as
// migrateVm does (cluster, source host, destination host, through the hosts' requestSlot activities),
// holds them for a while and gives them back.
import { proxyActivities, sleep } from '@temporalio/workflow';
import type { requestSlotActivity } from '../../activities/admission';
import { hostTaskQueue } from '../../common/types';
import { CLUSTER_SCOPE, hostScope } from '../../workflows/definitions';
import { Slots } from '../../workflows/slots';

export { admission } from '../../workflows/admission';

type RequestSlot = ReturnType<typeof requestSlotActivity>;

export interface ProbeInput {
  source: string;
  destination: string;
  holdMs: number;
}

export interface ProbeResult {
  /** Workflow time from asking to holding every slot. */
  waitedMs: number;
  grantedAtMs: number;
}

function requester(host: string): RequestSlot {
  return proxyActivities<{ requestSlot: RequestSlot }>({ taskQueue: hostTaskQueue(host), startToCloseTimeout: '1 minute' }).requestSlot;
}

export async function admissionProbe(input: ProbeInput): Promise<ProbeResult> {
  const slots = new Slots();
  const src = requester(input.source);
  const dst = requester(input.destination);
  const asked = Date.now();
  await slots.acquire(
    [
      { scope: CLUSTER_SCOPE, request: (ticket) => src({ scope: 'cluster', ticket }) },
      { scope: hostScope(input.source), request: (ticket) => src({ scope: 'host', ticket }) },
      { scope: hostScope(input.destination), request: (ticket) => dst({ scope: 'host', ticket }) },
    ],
    () => undefined,
  );
  const grantedAtMs = Date.now();
  if (input.holdMs > 0) await sleep(input.holdMs);
  await slots.release();
  return { waitedMs: grantedAtMs - asked, grantedAtMs };
}
