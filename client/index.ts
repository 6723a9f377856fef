// The public entry of the Ferry package: `import { connectFerry } from 'ferry'`.
export { connectFerry, resolveConnection, type ConnectFerryOptions, type FerryTlsOptions, type ResolvedConnection } from './connection';
export {
  FerryClient,
  MigrationHandle,
  migrationQuery,
  type HostAgent,
  type MigrateOptions,
  type MigrationFilter,
  type MigrationState,
  type MigrationSummary,
} from './ferry-client';
export { FerryRequestError, HostNotAnswering, HostUnavailable, MigrationAlreadyRunning, MigrationNotFound, ValidationFailed, VmNotFound } from './errors';
export { followMigration, formatBytes, formatReport } from './cli/progress-view';
export type * from '../common/migration';
export { DEFAULTS } from '../common/migration';
export type { VmSummary } from '../activities';
export type { Workload } from '../common/types';
