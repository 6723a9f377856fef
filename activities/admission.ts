// The host side of admission: a migration asks its hosts' agents for slots, and each agent signals
// (with signal-with-start) the semaphore workflow of the scope with the limit it is configured with.
import { ApplicationFailure, Context, getClient } from '@temporalio/activity';
import { CLUSTER_SCOPE, admissionWorkflowId, hostScope, requestSlotSignal, type AdmissionState } from '../workflows/definitions';

export interface SlotLimits {
  host: number;
  cluster: number;
}

/** The `requestSlot` activity of the agent of `host`. */
export function requestSlotActivity(host: string, limits: SlotLimits, taskQueue: string) {
  return async function requestSlot(input: { scope: 'host' | 'cluster'; ticket: number }): Promise<void> {
    const run = Context.current().info.workflowExecution;
    if (!run) throw ApplicationFailure.nonRetryable('requestSlot is called by a migration workflow only', 'InvalidArgument');
    const scope = input.scope === 'cluster' ? CLUSTER_SCOPE : hostScope(host);
    const limit = input.scope === 'cluster' ? limits.cluster : limits.host;
    const initial: AdmissionState = { scope, limit, holders: [], waiting: [] };
    await getClient().workflow.signalWithStart('admission', {
      workflowId: admissionWorkflowId(scope, taskQueue),
      taskQueue,
      args: [initial],
      signal: requestSlotSignal,
      signalArgs: [{ holder: { workflowId: run.workflowId, runId: run.runId }, limit, ticket: input.ticket }],
    });
  };
}
