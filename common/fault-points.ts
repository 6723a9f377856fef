// Named pause points for the fault-injection harness (chaos/). Inert unless the agent runs with
// FERRY_FAULT_POINTS_DIR set: then a point whose `<dir>/<name>.arm` file exists writes
// `<dir>/<name>.reached` and waits until `<dir>/<name>.release` exists, so the harness can inject a
// fault at exactly that instant (kill a process, cut a link) before letting the code go on.
import { promises as fs } from 'node:fs';
import path from 'node:path';

export type FaultPointName =
  | 'switchover-before-pause'
  | 'switchover-after-pause'
  | 'switchover-after-prepared'
  | 'switchover-after-commit'
  /** The source's postcopy push, with stale blocks still to send (reached only when there are some). */
  | 'postcopy-push';

const POLL_MS = 50;

export async function faultPoint(name: FaultPointName): Promise<void> {
  const dir = process.env.FERRY_FAULT_POINTS_DIR;
  if (!dir) return;
  const file = (suffix: string) => path.join(dir, `${name}.${suffix}`);
  if (!(await exists(file('arm')))) return;
  await fs.writeFile(file('reached'), String(process.pid));
  while (!(await exists(file('release')))) await new Promise((r) => setTimeout(r, POLL_MS));
}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}
