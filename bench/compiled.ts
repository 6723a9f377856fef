// The benchmarks measure Ferry as it is deployed: agents (and the VM processes they start) run from
// the compiled dist/, not through tsx, whose start-up would otherwise sit on the critical path of
// every destination VM. `--from-sources` measures the development path instead.
import { spawn } from 'node:child_process';
import path from 'node:path';

const REPO = path.resolve(__dirname, '..');

/** `npm run build` in the repository; rejects with its output when it fails. */
export function buildDist(say: (line: string) => void): Promise<void> {
  say('npm run build: the agents run from the compiled dist/, as deployed (--from-sources skips this)');
  return new Promise((resolve, reject) => {
    const child = spawn('npm', ['run', '-s', 'build'], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`npm run build exited with ${code}:\n${out}`))));
  });
}
