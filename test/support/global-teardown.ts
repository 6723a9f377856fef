/** Jest global teardown: stops the server that global setup started (if it started one). */
import { ADDRESS_ENV, HANDLE_KEY, UI_ENV, type TestServerHandle } from './global-setup';

export default async function globalTeardown(): Promise<void> {
  const store = globalThis as Record<string, unknown>;
  const handle = store[HANDLE_KEY] as TestServerHandle | undefined;
  if (!handle) return;
  delete store[HANDLE_KEY];
  delete process.env[ADDRESS_ENV];
  delete process.env[UI_ENV];
  await handle.stop();
}
