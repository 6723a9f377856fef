// A plain file (a raw image) as an NBD backend. It takes no lock on the file (Node.js opens files
// without flock or OFD locks), so QEMU can open the same image later, or meanwhile.
import { promises as fs } from 'node:fs';
import type { NbdBackend } from './backend';

const ZEROES = Buffer.alloc(1 << 20);

export class FileBackend implements NbdBackend {
  readonly multiConn = true;

  private constructor(
    private readonly fh: fs.FileHandle,
    readonly size: number,
    readonly readOnly: boolean,
    readonly path: string,
  ) {}

  static async open(path: string, opts: { readOnly?: boolean } = {}): Promise<FileBackend> {
    const readOnly = opts.readOnly ?? false;
    const fh = await fs.open(path, readOnly ? 'r' : 'r+');
    try {
      return new FileBackend(fh, (await fh.stat()).size, readOnly, path);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) {
        buf.fill(0, done); // the file shrank under us: past its end reads as zeroes
        break;
      }
      done += bytesRead;
    }
    return buf;
  }

  async write(offset: number, data: Buffer, opts: { fua: boolean }): Promise<void> {
    for (let done = 0; done < data.length; ) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
    if (opts.fua) await this.fh.datasync();
  }

  flush(): Promise<void> {
    return this.fh.datasync();
  }

  /** Discard is a hint and Node.js cannot punch holes: accepted and ignored. */
  async trim(): Promise<void> {}

  async writeZeroes(offset: number, length: number, opts: { fua: boolean }): Promise<void> {
    for (let at = 0; at < length; at += ZEROES.length) await this.write(offset + at, ZEROES.subarray(0, Math.min(ZEROES.length, length - at)), { fua: false });
    if (opts.fua) await this.fh.datasync();
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}
