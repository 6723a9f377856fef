// Messages of the migrateVm workflow, shared by the workflow, the client and the CLI.
import { defineQuery, defineSignal, defineUpdate } from '@temporalio/workflow';
import { SearchAttributeType, defineSearchAttributeKey } from '@temporalio/common';
import { DEFAULT_TASK_QUEUE } from '../common/types';
import type { DestinationLostResolution, RetryState } from '../common/migration';
import type { PublishedProgress } from '../common/progress';

/** The workflow's progress and its track; clients show liveProgress() of it (common/progress.ts). */
export const progressQuery = defineQuery<PublishedProgress>('progress');
/** Abort before the commit point; refused (with the reason) after it. */
export const abortUpdate = defineUpdate<{ accepted: true; phase: string }, [string]>('abort');
/** Let a `cutover: manual` migration switch over; refused (with the reason) for any other. */
export const approveCutoverUpdate = defineUpdate<{ accepted: true; phase: string }, []>('approveCutover');
/**
 * The operator's last word on a destination lost after the Final message left (the source waits,
 * paused, for its answer): resume the source, and fence the lost host's copy for when it returns.
 * Refused unless the migration waits for exactly that.
 */
export const resolveDestinationLostUpdate = defineUpdate<{ accepted: true; host: string; epoch: number }, [DestinationLostResolution]>('resolveDestinationLost');
export const setBandwidthSignal = defineSignal<[number | null]>('setBandwidth');
/** Sent by an agent when a step of the migration failed and is retried (activities/failures.ts). */
export const stepRetryingSignal = defineSignal<[RetryState]>('stepRetrying');

export const SearchAttributes = {
  vmId: defineSearchAttributeKey('FerryVmId', SearchAttributeType.KEYWORD),
  sourceHost: defineSearchAttributeKey('FerrySourceHost', SearchAttributeType.KEYWORD),
  destinationHost: defineSearchAttributeKey('FerryDestinationHost', SearchAttributeType.KEYWORD),
  phase: defineSearchAttributeKey('FerryPhase', SearchAttributeType.KEYWORD),
  mode: defineSearchAttributeKey('FerryMode', SearchAttributeType.KEYWORD),
  incremental: defineSearchAttributeKey('FerryIncremental', SearchAttributeType.BOOL),
  outcome: defineSearchAttributeKey('FerryOutcome', SearchAttributeType.KEYWORD),
};

// ----- admission: slots that bound how many migrations run at once, per host and cluster-wide -----

/** A migration run that holds or waits for a slot. */
export interface SlotHolder {
  workflowId: string;
  runId: string;
}
export interface SlotRequest {
  holder: SlotHolder;
  /** Echoed in the grant, so a grant that crossed a release in flight is not taken for a new one. */
  ticket: number;
  /** The limit as the requesting host's agent is configured; the latest request's limit applies. */
  limit: number;
}
export interface AdmissionState {
  scope: string;
  limit: number;
  holders: SlotRequest[];
  waiting: SlotRequest[];
  /** Continue as new past this many history events (default ADMISSION_HISTORY_EVENTS; load tests set it lower). */
  historyLimit?: number;
  /** Holders that asked again (a retried request): grant them again, the first grant may have been lost. */
  regrant?: SlotRequest[];
}
export const requestSlotSignal = defineSignal<[SlotRequest]>('requestSlot');
/**
 * `ticket`: the latest ticket the holder asked with in this scope. The release withdraws that request
 * and older ones, never a newer one: signals buffered before a run's first workflow task reach their
 * handlers grouped by signal name, so a re-request can be handled before the release it followed.
 * (Releases from before the field withdraw every request of the holder.)
 */
export const releaseSlotSignal = defineSignal<[SlotHolder & { ticket?: number }]>('releaseSlot');
/** Sent by the admission workflow to a migration when its slot in `scope` is granted. */
export const slotGrantedSignal = defineSignal<[{ scope: string; ticket: number }]>('slotGranted');
export const admissionStateQuery = defineQuery<AdmissionState>('admissionState');

/** Scopes: the whole cluster, or one host (as source or destination alike). */
export const CLUSTER_SCOPE = 'cluster';
export function hostScope(host: string): string {
  return `host-${host}`;
}
/** The admission workflow of a scope in the deployment of `taskQueue` (the default deployment's keep their first names). */
export function admissionWorkflowId(scope: string, taskQueue: string): string {
  return taskQueue === DEFAULT_TASK_QUEUE ? `ferry-admission-${scope}` : `ferry-admission-${taskQueue}-${scope}`;
}
