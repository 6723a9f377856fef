// DiskAccess over a raw image file (positional reads and writes; the NBD export of the QEMU driver).
import * as fsp from 'node:fs/promises';
import type { DiskAccess } from './driver';
import { HypervisorError } from './errors';

export class FileDiskAccess implements DiskAccess {
  private constructor(
    private readonly file: fsp.FileHandle,
    readonly sizeBytes: number,
    private readonly path: string,
  ) {}

  static async open(path: string): Promise<FileDiskAccess> {
    const file = await fsp.open(path, 'r+');
    const { size } = await file.stat();
    return new FileDiskAccess(file, size, path);
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new HypervisorError(
        'InvalidArgument',
        `range [${offset}, ${offset + length}) is outside the ${this.sizeBytes}-byte disk ${this.path}: the last block is shorter`,
      );
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.check(offset, length);
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.file.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) {
        buf.fill(0, done);
        break;
      }
      done += bytesRead;
    }
    return buf;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.check(offset, data.length);
    let done = 0;
    while (done < data.length) {
      done += (await this.file.write(data, done, data.length - done, offset + done)).bytesWritten;
    }
  }

  async flush(): Promise<void> {
    await this.file.datasync();
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}
