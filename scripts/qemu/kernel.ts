// The guest's Linux kernel: FERRY_GUEST_KERNEL, else one unpacked in the cache, else Debian's
// linux-image-*-cloud-amd64 fetched with `apt-get download` and unpacked with `dpkg-deb -x` into the
// cache (never installed into /boot). Its modules stay beside it for the initramfs.
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { ferryCacheRoot } from '../temporal-cli';
import { errorMessage, runStreaming, tempSibling, type LogFn } from '../provisioning';
import { Apt } from './apt';
import type { Missing } from './binaries';

const ENV_VAR = 'FERRY_GUEST_KERNEL';
export const KERNEL_METAPACKAGE = 'linux-image-cloud-amd64';

export interface GuestKernel {
  kernel: string;
  /** `uname -r` of the guest, e.g. 6.1.0-57-cloud-amd64. */
  kernelVersion: string;
  /** lib/modules/<version> of this kernel, or null when none was found (all drivers built in). */
  modulesDir: string | null;
}

export function qemuCacheDir(): string {
  return path.join(ferryCacheRoot(), 'qemu');
}

/** FERRY_GUEST_KERNEL, or the newest kernel unpacked in the cache (downloads nothing). */
export async function findGuestKernel(): Promise<GuestKernel | Missing> {
  const explicit = process.env[ENV_VAR];
  if (explicit) return fromFile(path.resolve(explicit));
  const cached = await newestCached();
  return (
    cached ?? {
      missing: `no guest kernel in ${qemuCacheDir()}: run npm run setup:qemu (it downloads Debian's ${KERNEL_METAPACKAGE}), or set ${ENV_VAR} (and FERRY_GUEST_INITRD) to a kernel of your own`,
    }
  );
}

/** findGuestKernel, else downloads and unpacks Debian's cloud kernel into the cache. */
export async function ensureGuestKernel(apt: Apt, log: LogFn): Promise<GuestKernel | Missing> {
  const found = await findGuestKernel();
  if (!('missing' in found) || process.env[ENV_VAR]) return found;
  if (!Apt.available()) return { missing: `${found.missing} (downloading one needs Debian's apt-get and dpkg-deb)` };
  try {
    return await download(apt, log);
  } catch (err) {
    return { missing: `could not provision a guest kernel: ${errorMessage(err)}. Set ${ENV_VAR} and FERRY_GUEST_INITRD to use your own` };
  }
}

async function download(apt: Apt, log: LogFn): Promise<GuestKernel> {
  let pkg = await kernelPackage();
  if (!pkg && (await apt.updateOnce())) pkg = await kernelPackage();
  if (!pkg) throw new Error(`${KERNEL_METAPACKAGE} is not in the apt lists (run apt-get update as root; is this Debian?)`);
  const version = pkg.replace(/^linux-image-/, '');
  const target = path.join(qemuCacheDir(), `kernel-${version}`);
  await fsp.mkdir(qemuCacheDir(), { recursive: true });
  const tmp = tempSibling(target);
  await fsp.mkdir(tmp, { recursive: true });
  try {
    log(`downloading ${pkg} (apt-get download)`);
    await apt.download(pkg, tmp);
    const deb = (await fsp.readdir(tmp)).find((f) => f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg} left no .deb in ${tmp}`);
    log(`unpacking ${deb} (dpkg-deb -x) into ${target}`);
    const tree = path.join(tmp, 'tree');
    const result = await runStreaming('dpkg-deb', ['-x', path.join(tmp, deb), tree], { log });
    if (result.code !== 0) throw new Error(`dpkg-deb -x ${deb} failed (exit ${result.code}): ${result.tail.join('\n')}`);
    await fsp.rm(path.join(tmp, deb));
    const kernel = await fromTree(tree, version);
    if (!kernel) throw new Error(`${deb} holds no boot/vmlinuz-${version}`);
    await renameInto(tree, target);
  } finally {
    await fsp.rm(tmp, { recursive: true, force: true });
  }
  const kernel = await fromTree(target, version);
  if (!kernel) throw new Error(`${target} holds no boot/vmlinuz-${version}`);
  return kernel;
}

/** The concrete package the metapackage's candidate depends on, e.g. linux-image-6.1.0-57-cloud-amd64. */
async function kernelPackage(): Promise<string | null> {
  const stdout = await new Promise<string>((resolve) => {
    execFile('apt-cache', ['depends', KERNEL_METAPACKAGE], { timeout: 60_000 }, (_err, out) => resolve(out ?? ''));
  });
  return /Depends:\s+(linux-image-\S+-cloud-amd64)\b/.exec(stdout)?.[1] ?? null;
}

/** A rename that loses the race to another process's identical download is fine. */
async function renameInto(from: string, to: string): Promise<void> {
  try {
    await fsp.rename(from, to);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
  }
}

async function newestCached(): Promise<GuestKernel | null> {
  const names = await fsp.readdir(qemuCacheDir()).catch(() => [] as string[]);
  const versions = names
    .filter((n) => n.startsWith('kernel-') && !n.includes('.tmp-'))
    .map((n) => n.slice('kernel-'.length))
    .sort((a, b) => b.localeCompare(a, 'en', { numeric: true }));
  for (const version of versions) {
    const kernel = await fromTree(path.join(qemuCacheDir(), `kernel-${version}`), version);
    if (kernel) return kernel;
  }
  return null;
}

async function fromTree(tree: string, version: string): Promise<GuestKernel | null> {
  const kernel = path.join(tree, 'boot', `vmlinuz-${version}`);
  if (!(await fsp.stat(kernel).catch(() => null))?.isFile()) return null;
  const modulesDir = path.join(tree, 'lib', 'modules', version);
  const hasModules = (await fsp.stat(modulesDir).catch(() => null))?.isDirectory() ?? false;
  return { kernel, kernelVersion: version, modulesDir: hasModules ? modulesDir : null };
}

async function fromFile(kernel: string): Promise<GuestKernel | Missing> {
  let version: string;
  try {
    version = await readKernelVersion(kernel);
  } catch (err) {
    return { missing: `${ENV_VAR}=${kernel}: ${errorMessage(err)}. Point it at an x86 bzImage (vmlinuz), or unset it` };
  }
  const candidates = [path.join(qemuCacheDir(), `kernel-${version}`, 'lib', 'modules', version), path.join('/lib/modules', version)];
  for (const dir of candidates) {
    if ((await fsp.stat(dir).catch(() => null))?.isDirectory()) return { kernel, kernelVersion: version, modulesDir: dir };
  }
  return { kernel, kernelVersion: version, modulesDir: null };
}

/** The version string of an x86 bzImage, from its setup header (`kernel_version` at 0x20e). */
export async function readKernelVersion(bzImage: string): Promise<string> {
  const file = await fsp.open(bzImage, 'r');
  try {
    const head = Buffer.alloc(0x4000);
    const { bytesRead } = await file.read(head, 0, head.length, 0);
    if (bytesRead < 0x210 || head.toString('latin1', 0x202, 0x206) !== 'HdrS') throw new Error('not a bzImage (no HdrS setup header)');
    const at = head.readUInt16LE(0x20e) + 0x200;
    const end = head.indexOf(0, at);
    if (at >= bytesRead || end < 0) throw new Error('the bzImage names no kernel version');
    const version = head.toString('latin1', at, end).split(' ')[0];
    if (!version) throw new Error('the bzImage names no kernel version');
    return version;
  } finally {
    await file.close();
  }
}
