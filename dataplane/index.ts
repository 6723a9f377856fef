// Public API of the data plane. Wire format: PROTOCOL.md.
export * from './api';
export { connect } from './client';
export { listen } from './server';
export { sessionTag } from './auth';
export { PROTOCOL_VERSION, MAX_DATA_BYTES, MAX_META_BYTES } from './frame';
