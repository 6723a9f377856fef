// The end of a process's log, for an error that says why the process did not start.
import * as fs from 'node:fs';

export function logTail(file: string, bytes = 2000): string {
  try {
    const data = fs.readFileSync(file);
    return data.subarray(Math.max(0, data.length - bytes)).toString('utf8');
  } catch {
    return '(no log)';
  }
}
