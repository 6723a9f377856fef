// The benchmarks measure Ferry as it is deployed: agents (and the VM processes they start) run from
// the compiled dist/, not through tsx, whose start-up would otherwise sit on the critical path of
// every destination VM. `--from-sources` measures the development path instead.
import path from 'node:path';
import { runStreaming } from '../scripts/provisioning';

const REPO = path.resolve(__dirname, '..');

/** `npm run build` in the repository; rejects with its last output when it fails. */
export async function buildDist(say: (line: string) => void): Promise<void> {
  say('npm run build: the agents run from the compiled dist/, as deployed (--from-sources skips this)');
  const r = await runStreaming('npm', ['run', '-s', 'build'], { log: () => undefined, cwd: REPO });
  if (r.code !== 0) throw new Error(`npm run build exited with ${r.code}:\n${r.tail.join('\n')}`);
}
