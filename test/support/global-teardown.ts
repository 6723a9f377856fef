/** Jest global teardown: stops the server that global setup started (if it started one). */
import type { ChildProcess } from 'node:child_process';
import { ADDRESS_ENV, HANDLE_KEY, PROVISION_KEY, UI_ENV, type TestServerHandle } from './global-setup';

export default async function globalTeardown(): Promise<void> {
  const store = globalThis as Record<string, unknown>;
  // Still building (the test that needed it was skipped or failed early): stop it; go's build cache keeps what it did.
  const provisioning = store[PROVISION_KEY] as ChildProcess | undefined;
  if (provisioning?.pid && provisioning.exitCode === null && provisioning.signalCode === null) {
    try {
      process.kill(-provisioning.pid, 'SIGTERM'); // its process group: go and the compilers it runs
    } catch {
      // ended meanwhile
    }
  }
  delete store[PROVISION_KEY];
  const handle = store[HANDLE_KEY] as TestServerHandle | undefined;
  if (!handle) return;
  delete store[HANDLE_KEY];
  delete process.env[ADDRESS_ENV];
  delete process.env[UI_ENV];
  await handle.stop();
}
