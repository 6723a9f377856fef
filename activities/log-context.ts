// Every activity that works on a migration or a VM runs inside a log context naming them, so each
// line it logs (and every line of the transfers it starts) carries migrationId and vmId.
import type { ActivityInterceptors } from '@temporalio/worker';
import { withLogContext, type LogContext } from '../common/log';

type Ids = { migrationId?: unknown; vmId?: unknown };

/** The ids in an activity's input: `{ migrationId, vmId }` directly or in its MigrationRef (`ref`). */
export function migrationLogFields(args: readonly unknown[]): LogContext {
  const input = args[0] as (Ids & { ref?: Ids | null }) | null | undefined;
  const fields: LogContext = {};
  for (const source of [input?.ref, input]) {
    if (typeof source?.migrationId === 'string') fields.migrationId ??= source.migrationId;
    if (typeof source?.vmId === 'string') fields.vmId ??= source.vmId;
  }
  return fields;
}

export function logContextInterceptor(): ActivityInterceptors {
  return {
    inbound: {
      execute: (input, next) => withLogContext(migrationLogFields(input.args), () => next(input)),
    },
  };
}
