// Messages of the migrateVm workflow, shared by the workflow, the client and the CLI.
import { defineQuery, defineSignal, defineUpdate } from '@temporalio/workflow';
import { SearchAttributeType, defineSearchAttributeKey } from '@temporalio/common';
import type { MigrationProgress } from '../common/migration';

export const progressQuery = defineQuery<MigrationProgress>('progress');
/** Abort before the commit point; refused (with the reason) after it. */
export const abortUpdate = defineUpdate<{ accepted: true; phase: string }, [string]>('abort');
export const approveCutoverSignal = defineSignal('approveCutover');
export const setBandwidthSignal = defineSignal<[number | null]>('setBandwidth');

export const SearchAttributes = {
  vmId: defineSearchAttributeKey('FerryVmId', SearchAttributeType.KEYWORD),
  sourceHost: defineSearchAttributeKey('FerrySourceHost', SearchAttributeType.KEYWORD),
  destinationHost: defineSearchAttributeKey('FerryDestinationHost', SearchAttributeType.KEYWORD),
  phase: defineSearchAttributeKey('FerryPhase', SearchAttributeType.KEYWORD),
  mode: defineSearchAttributeKey('FerryMode', SearchAttributeType.KEYWORD),
  incremental: defineSearchAttributeKey('FerryIncremental', SearchAttributeType.BOOL),
  outcome: defineSearchAttributeKey('FerryOutcome', SearchAttributeType.KEYWORD),
};
