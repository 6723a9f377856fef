// What a migration spent its time on, read back from its Temporal workflow history: the time the
// host agents themselves measured moving bytes (the durationMs in the results of the transfer
// activities), the dirty blocks of every disk round, and wall time per activity type.
import type { WorkflowHandle } from '@temporalio/client';
import { defaultPayloadConverter } from '@temporalio/common';

export interface HistoryBreakdown {
  /** Sum of the durations the source measured inside the transfer activities (first pass, dirty rounds, the switchover's memory precopy and freeze, postcopy). */
  transferMs: number;
  /** Blocks sent by each disk dirty round, in order (the last one is the round just before the freeze). */
  dirtyBlocksPerRound: number[];
  /** Blocks left stale at the freeze (pushed by postcopy in tpm mode, sent in the freeze in precopy mode). */
  staleBlocksAtFreeze: number | null;
  /** Per activity type: how many ran, and their summed start-to-completion time (ms). */
  activities: Record<string, { count: number; ms: number }>;
  /** Summed schedule-to-start latency of every activity: Temporal round trips and queueing (ms). */
  queueMs: number;
  /** Every completed activity in order: when it started (epoch ms), wall time (start to completion), and what its result says it moved. */
  steps: { type: string; startedAtMs: number; ms: number; bytes: number | null; items: number | null; durationMs: number | null }[];
  /** How long the source measured the VM frozen in the switchover (ms). */
  freezeMs: number | null;
}

type Timestamp = { seconds?: unknown; nanos?: number | null } | null | undefined;

const tsMs = (t: Timestamp): number => (t ? Number(String(t.seconds ?? 0)) * 1000 + (t.nanos ?? 0) / 1e6 : 0);
const id = (v: unknown): string => String(v ?? '');

interface Result {
  bytes?: number;
  durationMs?: number;
  freezeMs?: number;
  items?: number;
  staleBlocks?: number;
}

export async function historyBreakdown(workflow: WorkflowHandle): Promise<HistoryBreakdown> {
  const history = await workflow.fetchHistory();
  const scheduled = new Map<string, { type: string; at: number }>();
  const started = new Map<string, number>();
  const out: HistoryBreakdown = { transferMs: 0, dirtyBlocksPerRound: [], staleBlocksAtFreeze: null, activities: {}, queueMs: 0, steps: [], freezeMs: null };
  for (const ev of history.events ?? []) {
    const at = tsMs(ev.eventTime as Timestamp);
    if (ev.activityTaskScheduledEventAttributes) {
      scheduled.set(id(ev.eventId), { type: ev.activityTaskScheduledEventAttributes.activityType?.name ?? '?', at });
    } else if (ev.activityTaskStartedEventAttributes) {
      started.set(id(ev.activityTaskStartedEventAttributes.scheduledEventId), at);
    } else if (ev.activityTaskCompletedEventAttributes) {
      const attrs = ev.activityTaskCompletedEventAttributes;
      const sched = scheduled.get(id(attrs.scheduledEventId));
      if (!sched) continue;
      const start = started.get(id(attrs.scheduledEventId)) ?? sched.at;
      out.queueMs += start - sched.at;
      const a = (out.activities[sched.type] ??= { count: 0, ms: 0 });
      a.count++;
      a.ms += at - start;
      const payload = attrs.result?.payloads?.[0];
      const r = ((payload ? defaultPayloadConverter.fromPayload(payload) : null) ?? {}) as Result;
      out.steps.push({ type: sched.type, startedAtMs: Math.round(start), ms: Math.round(at - start), bytes: r.bytes ?? null, items: r.items ?? null, durationMs: r.durationMs ?? r.freezeMs ?? null });
      switch (sched.type) {
        case 'copyDiskFirstPass':
        case 'postcopy':
          out.transferMs += r.durationMs ?? 0;
          break;
        case 'copyDiskDirty':
          out.transferMs += r.durationMs ?? 0;
          out.dirtyBlocksPerRound.push(r.items ?? 0);
          break;
        case 'switchover':
          // durationMs: the memory precopy and the freeze (histories recorded before it carry only freezeMs).
          out.transferMs += r.durationMs ?? r.freezeMs ?? 0;
          out.freezeMs = r.freezeMs ?? null;
          out.staleBlocksAtFreeze = r.staleBlocks ?? null;
          break;
      }
    }
  }
  for (const a of Object.values(out.activities)) a.ms = Math.round(a.ms);
  out.queueMs = Math.round(out.queueMs);
  return out;
}
