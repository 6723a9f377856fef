// Where the Chromium for the Web UI test is: FERRY_CHROMIUM, Debian's /usr/bin/chromium, or PATH.
// Ferry never downloads a browser: playwright-core drives the system's Chromium.
import { accessSync, constants } from 'node:fs';
import path from 'node:path';

const NAMES = ['chromium', 'chromium-browser'];

function executable(file: string): boolean {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The Chromium executable, or null when there is none. A FERRY_CHROMIUM that is not executable is an error. */
export function findChromium(env: NodeJS.ProcessEnv = process.env): string | null {
  if (env.FERRY_CHROMIUM) {
    if (!executable(env.FERRY_CHROMIUM)) throw new Error(`FERRY_CHROMIUM=${env.FERRY_CHROMIUM} is not an executable file`);
    return env.FERRY_CHROMIUM;
  }
  if (executable('/usr/bin/chromium')) return '/usr/bin/chromium';
  for (const dir of (env.PATH ?? '').split(path.delimiter).filter(Boolean)) {
    for (const name of NAMES) if (executable(path.join(dir, name))) return path.join(dir, name);
  }
  return null;
}

export const INSTALL_HINT =
  'install Debian\'s Chromium (sudo apt-get -o DPkg::Lock::Timeout=600 install -y chromium), or set FERRY_CHROMIUM to a Chromium executable';

/** Flags for a headless Chromium in a container or CI runner (no sandbox, no GPU, small /dev/shm). */
export const HEADLESS_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'];
