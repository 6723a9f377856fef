// Network-namespace tests need root. Without it they skip with a loud reason; in CI (CI set) they fail.
// Whether namespaces can really be made is checked in the test's beforeAll (harness/netns.ts).
import { spawnSync } from 'node:child_process';

export const inCi = Boolean(process.env.CI) && process.env.CI !== 'false';

function reason(): string | null {
  if (process.platform !== 'linux') return 'network namespaces are a Linux feature';
  if (process.getuid?.() !== 0) return 'network namespaces need root (run the tests as root, as CI does)';
  if (spawnSync('ip', ['-V'], { stdio: 'ignore' }).status !== 0) return 'the ip command is missing (Debian: apt-get install iproute2)';
  return null;
}

/** Why this machine cannot run the network-namespace tests, or null. */
export const netnsMissing = reason();

/** `describe`, or (outside CI, when namespaces cannot be used) `describe.skip`, saying why. */
export function describeNetns(name: string, fn: () => void): void {
  if (netnsMissing && !inCi) {
    process.stderr.write(`\n*** SKIPPED: ${name}: ${netnsMissing} ***\n\n`);
    describe.skip(name, fn);
    return;
  }
  describe(name, () => {
    beforeAll(() => {
      if (netnsMissing) throw new Error(`${name} must run in CI, but ${netnsMissing}`);
    });
    fn();
  });
}
