// Errors of the hypervisor drivers. `code` is the control protocol's (and QMP's) error class, so an error
// raised inside the VM process arrives at the driver's caller with the same code and description.
export type HypervisorErrorCode =
  | 'VmNotFound'
  | 'VmNotRunning'
  | 'VmExists'
  | 'InvalidArgument'
  | 'InvalidState'
  | 'CommandNotFound'
  | 'BitmapNotFound'
  | 'BitmapExists'
  | 'ParseError'
  | 'LineTooLong'
  | 'AttachmentTooLarge'
  | 'Timeout'
  | 'ConnectionClosed'
  | 'GenericError';

export class HypervisorError extends Error {
  constructor(
    readonly code: HypervisorErrorCode | string,
    /** The description without the code prefix (what travels in the protocol's "desc"). */
    readonly detail: string,
  ) {
    super(`${code}: ${detail}`);
    this.name = 'HypervisorError';
  }
}

export const isHypervisorError = (e: unknown, code?: string): e is HypervisorError =>
  e instanceof HypervisorError && (code === undefined || e.code === code);
