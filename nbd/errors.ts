// Errors of Ferry's NBD client and server. One root, NbdError; each says what failed and, where
// there is one, what to do about it.

export class NbdError extends Error {
  override name = 'NbdError';
}

/** The peer broke the protocol (bad magic, a malformed or unexpected reply). The connection is dropped. */
export class NbdProtocolError extends NbdError {
  override name = 'NbdProtocolError';
}

/** The connection could not be made or the handshake did not complete. */
export class NbdConnectError extends NbdError {
  override name = 'NbdConnectError';
}

/** The server refused an option of the handshake with an NBD_REP_ERR_* reply. */
export class NbdOptionError extends NbdConnectError {
  override name = 'NbdOptionError';
  constructor(
    message: string,
    /** NBD_REP_ERR_UNKNOWN and so on. */
    readonly reply: string,
    /** The server's own message, if it sent one. */
    readonly serverMessage: string,
  ) {
    super(message);
  }
}

/** The server answered a command with an error (NBD_EIO, NBD_ENOSPC, ...). The connection stays usable. */
export class NbdCommandError extends NbdError {
  override name = 'NbdCommandError';
  constructor(
    message: string,
    readonly command: string,
    /** The NBD error value and its name, e.g. 5 and NBD_EIO. */
    readonly errno: number,
    readonly errnoName: string,
    readonly serverMessage: string,
  ) {
    super(message);
  }
}

/** The connection closed (or was closed) while the request was in flight, or before it was sent. */
export class NbdDisconnectedError extends NbdError {
  override name = 'NbdDisconnectedError';
}

/** A request or handshake that got no answer in time. */
export class NbdTimeoutError extends NbdError {
  override name = 'NbdTimeoutError';
}

/** A failure a backend reports with an NBD error value (otherwise Node.js error codes are mapped; the rest is EIO). */
export class NbdBackendError extends NbdError {
  override name = 'NbdBackendError';
  constructor(
    message: string,
    readonly errno: number,
  ) {
    super(message);
  }
}
