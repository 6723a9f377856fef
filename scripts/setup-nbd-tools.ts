/**
 * `npm run setup:nbd-tools`: libnbd's nbdinfo and nbdcopy, the peers that Ferry's NBD server is
 * tested against. As root with apt-get, installs Debian's libnbd-bin when they are missing; otherwise
 * says how. Not an error: the NBD server test skips with the reason (or fails when CI is set).
 */
import { findOnPath } from './provisioning';
import { Apt } from './qemu/apt';

export const NBD_TOOLS = ['nbdinfo', 'nbdcopy'];
export const NBD_TOOLS_PACKAGE = 'libnbd-bin';

const log = (line: string): void => void process.stderr.write(`[setup:nbd-tools] ${line}\n`);

async function missing(): Promise<string[]> {
  const found = await Promise.all(NBD_TOOLS.map((t) => findOnPath(t)));
  return NBD_TOOLS.filter((_, i) => !found[i]);
}

async function main(): Promise<void> {
  if ((await missing()).length > 0 && Apt.canInstall()) await new Apt(log).install([NBD_TOOLS_PACKAGE]).catch((err: Error) => log(err.message));
  const absent = await missing();
  if (absent.length === 0) console.log(`NBD tools: ${NBD_TOOLS.join(', ')} (${NBD_TOOLS_PACKAGE})`);
  else log(`missing ${absent.join(', ')}: the NBD server test will be skipped (and fails when CI is set). To run it: apt-get install ${NBD_TOOLS_PACKAGE}.`);
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(`setup:nbd-tools failed: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
