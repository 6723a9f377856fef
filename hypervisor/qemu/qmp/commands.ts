// A few QMP commands with their types, where Ferry branches on the answer. Everything else goes
// through QmpClient.execute with the command's name and arguments as QEMU documents them.

/** What executes QMP commands (QmpClient, or anything shaped like it). */
export interface QmpExecutor {
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts?: { timeoutMs?: number }): Promise<T>;
}

/** QEMU's RunState (qapi/run-state.json). */
export type RunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo';

export interface StatusInfo {
  running: boolean;
  status: RunState;
}

export function queryStatus(qmp: QmpExecutor): Promise<StatusInfo> {
  return qmp.execute<StatusInfo>('query-status');
}
