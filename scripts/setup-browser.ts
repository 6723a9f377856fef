/**
 * `npm run setup:browser`: makes sure a Chromium is there for the Web UI test (scripts/chromium.ts).
 * As root with apt-get, installs Debian's `chromium` (running `apt-get update` only if the install
 * fails without it); otherwise says how to install it. Never downloads a browser any other way.
 * A missing browser is not an error here: the UI test skips with the reason, or fails when CI=true.
 */
import { spawnSync } from 'node:child_process';
import { findChromium, INSTALL_HINT } from './chromium';

const log = (line: string): void => void process.stderr.write(`[setup:browser] ${line}\n`);

/** Another apt-get or dpkg holding the lock (an unattended upgrade, another job) is waited for, not failed on. */
const DPKG_LOCK_TIMEOUT_S = 600;

function aptGet(...args: string[]): boolean {
  const argv = ['-o', `DPkg::Lock::Timeout=${DPKG_LOCK_TIMEOUT_S}`, ...args];
  log(`apt-get ${argv.join(' ')}`);
  const r = spawnSync('apt-get', argv, { stdio: ['ignore', 'inherit', 'inherit'], env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  return r.status === 0;
}

function canInstall(): boolean {
  return process.platform === 'linux' && process.getuid?.() === 0 && spawnSync('apt-get', ['--version'], { stdio: 'ignore' }).status === 0;
}

function main(): void {
  let found = findChromium();
  if (!found && canInstall()) {
    const install = ['install', '-y', 'chromium'];
    if (!aptGet(...install)) {
      if (aptGet('update')) aptGet(...install);
    }
    found = findChromium();
  }
  if (found) {
    const version = spawnSync(found, ['--version'], { encoding: 'utf8' }).stdout.trim();
    console.log(`Chromium: ${found}${version ? ` (${version})` : ''}`);
    return;
  }
  log(`no Chromium found: the Web UI test will be skipped (and fails when CI=true). To run it, ${INSTALL_HINT}.`);
}

if (require.main === module) {
  try {
    main();
  } catch (err) {
    console.error(`setup:browser failed: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  }
}
