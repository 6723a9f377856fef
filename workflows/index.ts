export { migrateVm } from './migrate-vm';
export { hostCommand } from './host-command';
export { fenceDestination } from './fence-destination';
