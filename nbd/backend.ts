// What Ferry's NBD server serves: a disk with a size and asynchronous I/O. The destination's
// postcopy disk (the stale-block map over the local image) implements it; FileBackend serves a
// plain file. A backend reports a failure by throwing: an NbdBackendError carries its NBD error
// value, a Node.js error its code (ENOSPC, EIO, ...), anything else becomes NBD_EIO.
import type { BlockSizes } from './protocol';

export interface NbdBackend {
  readonly size: number;
  /** Writes, trims and write-zeroes are refused with NBD_EPERM. */
  readonly readOnly?: boolean;
  /** One cache shared by every connection (a flush on one covers writes on all): advertises NBD_FLAG_CAN_MULTI_CONN. */
  readonly multiConn?: boolean;
  /** Constraints to advertise; unset fields take the defaults (1, 4096, 32 MiB). */
  readonly blockSizes?: Partial<BlockSizes>;
  readonly description?: string;
  read(offset: number, length: number): Promise<Buffer>;
  /** With `fua`, the data is on stable storage before the promise resolves. */
  write(offset: number, data: Buffer, opts: { fua: boolean }): Promise<void>;
  /** Every write that has resolved is on stable storage when this resolves. */
  flush(): Promise<void>;
  /** Without it, NBD_CMD_TRIM is not offered. */
  trim?(offset: number, length: number, opts: { fua: boolean }): Promise<void>;
  /** Without it, the server writes zero buffers through write(). The range must read back as zeroes. */
  writeZeroes?(offset: number, length: number, opts: { fua: boolean; noHole: boolean }): Promise<void>;
  /** A hint that the range will be read (the postcopy disk fetches it); without it, the server reads and drops. */
  cache?(offset: number, length: number): Promise<void>;
  /** `base:allocation` flags (State.HOLE, State.ZERO) of consecutive extents from `offset`; without it, all data (flags 0). */
  allocation?(offset: number, length: number): Promise<{ length: number; flags: number }[]>;
}
