// Waiting for a guest to work before migrating it: a QEMU guest boots Linux first (seconds under TCG),
// and a migration started earlier moves a guest that has written nothing yet, proving little.
import { setTimeout as sleep } from 'node:timers/promises';
import type { FerryClient } from '../client/ferry-client';

/** Until the guest of `vmId` on `host` has done `more` operations past the count it had when asked. */
export async function guestWorking(ferry: FerryClient, host: string, vmId: string, more = 20, timeoutMs = 180_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  const start = (await ferry.hostCommand(host, 'vmInspect', { vmId })).guest?.ops ?? 0;
  for (;;) {
    const s = await ferry.hostCommand(host, 'vmInspect', { vmId });
    if (s.guest && s.guest.ops >= start + more) return;
    if (Date.now() > until) {
      throw new Error(`the guest of ${vmId} on ${host} did not do ${more} operations within ${timeoutMs / 1000} s (state ${s.state}, ops ${s.guest?.ops ?? 'none'}); see its console log under the host's vms/${vmId}/`);
    }
    await sleep(250);
  }
}
