// hostCommand: run one VM-administration activity on a host's queue, so the CLI and programs reach
// every host through Temporal alone (no host registry, no extra RPC).
import { proxyActivities, ApplicationFailure } from '@temporalio/workflow';
import type { Activities } from '../activities';
import { hostTaskQueue } from '../common/types';

export const HOST_COMMANDS = ['vmCreate', 'vmList', 'vmInspect', 'vmStart', 'vmDestroy', 'vmPause', 'vmResume', 'vmVerify', 'baseList', 'baseDelete'] as const;
export type HostCommand = (typeof HOST_COMMANDS)[number];

export interface HostCommandInput<C extends HostCommand = HostCommand> {
  host: string;
  command: C;
  args: Parameters<Activities[C]>;
}

export async function hostCommand<C extends HostCommand>(input: HostCommandInput<C>): Promise<Awaited<ReturnType<Activities[C]>>> {
  if (!HOST_COMMANDS.includes(input.command)) {
    throw ApplicationFailure.nonRetryable(`unknown host command ${input.command}: use one of ${HOST_COMMANDS.join(', ')}`, 'ValidationError');
  }
  const acts = proxyActivities<Activities>({
    taskQueue: hostTaskQueue(input.host),
    startToCloseTimeout: '10 minutes',
    heartbeatTimeout: input.command === 'vmVerify' ? '30 seconds' : undefined,
    scheduleToStartTimeout: '30 seconds',
    retry: { maximumAttempts: 3, initialInterval: '500ms' },
  });
  const fn = acts[input.command] as (...args: unknown[]) => Promise<Awaited<ReturnType<Activities[C]>>>;
  return fn(...input.args);
}
