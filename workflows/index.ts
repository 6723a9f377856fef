export { migrateVm } from './migrate-vm';
export { hostCommand } from './host-command';
export { admission } from './admission';
export { fenceDestination, revokeDestination } from './fence-destination';
