// Small helpers for tests that check failures and resource hygiene.
import { promises as fs } from 'node:fs';

/** The error `p` rejects with (the test fails if it resolves). */
export async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

/** File descriptors this process holds now (a leak check compares two counts). */
export async function openFds(): Promise<number> {
  return (await fs.readdir('/proc/self/fd')).length;
}
