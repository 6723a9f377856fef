// fenceDestination: the abort of a rolled-back migration's destination shell, kept trying until the
// host answers. The migration itself ends at once (its VM runs on the source again); a destination
// that was down then fences the epoch and removes the shell as soon as its agent is back.
import { proxyActivities } from '@temporalio/workflow';
import type { Activities } from '../activities';
import { hostTaskQueue } from '../common/types';

export interface FenceDestinationInput {
  host: string;
  migrationId: string;
  vmId: string;
  epoch: number;
}

export const fenceWorkflowId = (migrationId: string, host: string): string => `fence-${host}-${migrationId}`;

export async function fenceDestination(input: FenceDestinationInput): Promise<void> {
  const { abortDestination } = proxyActivities<Activities>({
    taskQueue: hostTaskQueue(input.host),
    startToCloseTimeout: '1 minute',
    // A host gone for longer is decommissioned: its shell went with it.
    scheduleToCloseTimeout: '30 days',
    retry: { initialInterval: '2 seconds', maximumInterval: '5 minutes' },
  });
  await abortDestination({ migrationId: input.migrationId, vmId: input.vmId, epoch: input.epoch });
}
