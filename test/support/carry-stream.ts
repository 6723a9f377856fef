// The agent's part of a machine-state stream, in a test: carry the chunks of `src.migrateOut` into
// `dst.migrateIn`, let `atSwitchover` run while the hypervisor holds the guest paused, then finish.
import type { StreamLimits, StreamProgress, VmHandle } from '../../hypervisor/driver';

export async function carryMachineState(
  src: VmHandle,
  dst: VmHandle,
  opts: { limits?: Partial<StreamLimits>; atSwitchover?: () => Promise<void> } = {},
): Promise<StreamProgress> {
  const incoming = await dst.migrateIn();
  const out = await src.migrateOut({ downtimeLimitMs: 50, bandwidthBytesPerSecond: null, autoConverge: false, ...opts.limits });
  const pumped = (async () => {
    for await (const chunk of out.chunks) await incoming.write(chunk);
  })();
  try {
    await out.ready;
    await opts.atSwitchover?.();
    await out.continue();
    const done = await out.completed;
    await pumped;
    await incoming.completed;
    return done;
  } finally {
    incoming.close();
    pumped.catch(() => undefined);
  }
}
