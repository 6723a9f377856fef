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

export interface RevokeDestinationInput extends FenceDestinationInput {
  /** Who declared the host lost, when and why (ferry resolve --destination-lost). */
  by: string;
  at: string;
  reason: string;
}

export const revokeWorkflowId = (migrationId: string, host: string): string => `revoke-${host}-${migrationId}`;

/**
 * The fence of an epoch whose destination an operator declared lost after the Final message left:
 * started before the source resumes, it runs until the lost host's agent has destroyed its copy (an
 * agent also looks for it when it starts, before it resumes any committed VM).
 */
export async function revokeDestination(input: RevokeDestinationInput): Promise<void> {
  const { revokeDestination: revoke } = proxyActivities<Activities>({
    taskQueue: hostTaskQueue(input.host),
    startToCloseTimeout: '1 minute',
    scheduleToCloseTimeout: '365 days',
    retry: { initialInterval: '2 seconds', maximumInterval: '5 minutes' },
  });
  await revoke({ migrationId: input.migrationId, vmId: input.vmId, epoch: input.epoch });
}
