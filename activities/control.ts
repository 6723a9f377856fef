// Activities of the shared migration queue (not tied to a host): bookkeeping against Temporal itself.
import { getClient } from '@temporalio/activity';
import type { SlotHolder } from '../workflows/definitions';

export function createControlActivities() {
  return {
    /** The runs among `runs` that have closed (completed, failed, terminated, timed out...). */
    async closedRuns(runs: SlotHolder[]): Promise<SlotHolder[]> {
      const client = getClient();
      const closed: SlotHolder[] = [];
      for (const run of runs) {
        try {
          const d = await client.workflow.getHandle(run.workflowId, run.runId).describe();
          if (d.status.name !== 'RUNNING') closed.push(run);
        } catch (err) {
          if ((err as Error).name === 'WorkflowNotFoundError') closed.push(run);
          else throw err;
        }
      }
      return closed;
    },
  };
}

export type ControlActivities = ReturnType<typeof createControlActivities>;
