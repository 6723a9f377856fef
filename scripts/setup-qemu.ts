/**
 * `npm run setup:qemu`: provisions QEMU, the guest kernel and the guest's initramfs (see
 * qemu-assets.ts) and says where each came from. When they cannot be provisioned it says why and
 * exits 0: the QEMU tests then skip with that reason (or fail when CI is set).
 *
 * `--find` (used by the tests) provisions nothing and prints the assets, or the reason they are missing, as JSON.
 */
import { ensureQemuAssets, findQemuAssets } from './qemu-assets';

const log = (line: string): void => void process.stderr.write(`[setup:qemu] ${line}\n`);

async function main(args: string[]): Promise<void> {
  if (args.includes('--find')) {
    const found = await findQemuAssets({ log });
    process.stdout.write(`${JSON.stringify(found)}\n`);
    return;
  }
  const started = Date.now();
  const assets = await ensureQemuAssets({ log });
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  if ('missing' in assets) {
    console.log(`QEMU guest: not provisioned (${seconds} s): ${assets.missing}. The QEMU tests will be skipped (and fail when CI is set).`);
    return;
  }
  console.log(
    `QEMU ${assets.qemuVersion} (route ${assets.qemuRoute}), kernel ${assets.kernelVersion}, guest ${assets.guestVersion}: ` +
      `${assets.kernel} + ${assets.initrd} (${seconds} s)`,
  );
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    console.error(`setup:qemu failed: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
