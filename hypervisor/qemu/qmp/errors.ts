// Errors of Ferry's QMP client, under one root (as in QEMU's python qemu.qmp): what failed, and
// where there is one, what to do about it.

export class QmpError extends Error {
  override name = 'QmpError';
}

/** No QMP session could be set up: no socket, nobody accepting, no greeting, negotiation refused. */
export class QmpConnectError extends QmpError {
  override name = 'QmpConnectError';
}

/** QEMU sent something that is not QMP (not JSON, not an object, a reply nobody asked for). */
export class QmpProtocolError extends QmpError {
  override name = 'QmpProtocolError';
}

/** QEMU ran the command and it failed: QEMU's error class (GenericError, CommandNotFound, ...) and description. */
export class QmpCommandError extends QmpError {
  override name = 'QmpCommandError';
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`${command} failed: ${errorClass}: ${desc}`);
  }
}

/** The connection is gone: a command in flight got no reply, or the client was used after it closed. */
export class QmpDisconnectedError extends QmpError {
  override name = 'QmpDisconnectedError';
  constructor(
    message: string,
    /** True when close() ended the connection. */
    readonly byClient = false,
  ) {
    super(message);
  }
}

/** A command's reply, or an awaited event, did not come in time. */
export class QmpTimeoutError extends QmpError {
  override name = 'QmpTimeoutError';
}
