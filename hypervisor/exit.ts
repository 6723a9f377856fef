// How a VM process ended, in words (no I/O: the workflow uses it too).
import type { VmExit } from './driver';

/** "killed by SIGKILL at <time>", for messages and logs. */
export function describeExit(exit: VmExit): string {
  const how = exit.signal ? `killed by ${exit.signal}` : exit.code !== null ? `exit status ${exit.code}` : 'exit status unknown';
  return `${how} at ${exit.at}`;
}
