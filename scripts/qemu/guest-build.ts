// Builds Ferry's guest at setup: guest/ferry-guest.c with `gcc -static`, and the initramfs
// (busybox-static, guest/init as /init, the virtio modules, the guest program) packed by busybox's
// cpio applet and gzipped. Both are keyed by what went into them, so a change to the guest
// sources (or another kernel) builds anew, and both are written beside their place and renamed,
// so concurrent runs never see half a file.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { errorMessage, findOnPath, isExecutable, runStreaming, tempSibling, type LogFn } from '../provisioning';
import type { Missing } from './binaries';
import type { GuestKernel } from './kernel';
import { qemuCacheDir } from './kernel';
import { modulesToLoad, type KernelModule } from './kernel-modules';

export const GUEST_SOURCE_DIR = path.resolve(__dirname, '..', '..', 'guest');
const SOURCES = ['ferry-guest.c', 'init'];
const BUSYBOX_CANDIDATES = ['/bin/busybox', '/usr/bin/busybox'];
/** Debian packages that provide what the build needs. */
export const BUILD_PACKAGES = ['gcc', 'libc6-dev', 'busybox-static'];

/** A hash of the guest's sources: names the build, and the guest reports it (`guest=` in its ready line). */
export async function guestVersion(): Promise<string> {
  const h = createHash('sha256');
  for (const name of SOURCES) h.update(name).update('\0').update(await fsp.readFile(path.join(GUEST_SOURCE_DIR, name))).update('\0');
  return h.digest('hex').slice(0, 12);
}

/** What the build needs that this machine lacks (empty when it can build). */
export async function missingBuildTools(): Promise<string[]> {
  const lacks: string[] = [];
  if (!(await findOnPath('gcc'))) lacks.push('gcc');
  if (!(await findStaticBusybox())) lacks.push('a static busybox (busybox-static)');
  return lacks;
}

/** The compiled guest program in the cache (built if missing); it also runs on the host (`--dump`). */
export async function ensureGuestProgram(log: LogFn): Promise<string> {
  const version = await guestVersion();
  const target = path.join(qemuCacheDir(), `guest-${version}`, 'ferry-guest');
  if (await isExecutable(target)) return target;
  await fsp.mkdir(path.dirname(target), { recursive: true });
  const tmp = tempSibling(target);
  log(`building the guest program ${version} (gcc -static -O2 -pthread guest/ferry-guest.c)`);
  const args = ['-static', '-O2', '-pthread', '-Wall', '-Wextra', `-DGUEST_VERSION="${version}"`, '-o', tmp, path.join(GUEST_SOURCE_DIR, 'ferry-guest.c')];
  try {
    const result = await runStreaming('gcc', args, { log: (line) => log(`gcc: ${line}`) });
    if (result.notFound) throw new Error('gcc not found: install gcc and libc6-dev (static glibc)');
    if (result.code !== 0) {
      throw new Error(`gcc failed (exit ${result.code}); a static link needs glibc's static libraries (Debian: libc6-dev):\n${result.tail.join('\n')}`);
    }
    await fsp.rename(tmp, target);
  } finally {
    await fsp.rm(tmp, { force: true });
  }
  return target;
}

/** The initramfs for this kernel and these guest sources, in the cache (built if missing). */
export async function ensureInitramfs(kernel: GuestKernel, log: LogFn): Promise<{ initrd: string; guestVersion: string } | Missing> {
  const busybox = await findStaticBusybox();
  if (!busybox) return { missing: `no static busybox at ${BUSYBOX_CANDIDATES.join(' or ')}: install Debian's busybox-static (npm run setup:qemu does as root), or set FERRY_GUEST_INITRD` };
  let modules: KernelModule[] = [];
  if (kernel.modulesDir) {
    try {
      modules = await modulesToLoad(kernel.modulesDir);
    } catch (err) {
      return { missing: `the initramfs for kernel ${kernel.kernelVersion} cannot be built: ${errorMessage(err)}` };
    }
  } else {
    log(`no modules found for kernel ${kernel.kernelVersion}: assuming virtio-pci and virtio-blk are built in`);
  }
  const version = await guestVersion();
  const key = createHash('sha256')
    .update(`${version}\0${kernel.kernelVersion}\0${modules.map((m) => m.name).join(',')}\0`)
    .update(await fsp.readFile(busybox))
    .digest('hex')
    .slice(0, 16);
  const initrd = path.join(qemuCacheDir(), `initrd-${kernel.kernelVersion}-${key}.gz`);
  if ((await fsp.stat(initrd).catch(() => null))?.isFile()) return { initrd, guestVersion: version };
  try {
    const program = await ensureGuestProgram(log);
    log(`building the initramfs ${path.basename(initrd)} (busybox cpio, ${modules.length} modules: ${modules.map((m) => m.name).join(' ')})`);
    await packInitramfs({ busybox, program, modules }, initrd);
  } catch (err) {
    return { missing: `building the guest failed: ${errorMessage(err)}` };
  }
  return { initrd, guestVersion: version };
}

async function packInitramfs(parts: { busybox: string; program: string; modules: KernelModule[] }, target: string): Promise<void> {
  const stage = tempSibling(target.replace(/\.gz$/, ''));
  const tmp = tempSibling(target);
  try {
    for (const dir of ['bin', 'dev', 'proc', 'sys', 'tmp', 'etc', 'lib/modules']) await fsp.mkdir(path.join(stage, dir), { recursive: true });
    await fsp.copyFile(parts.busybox, path.join(stage, 'bin', 'busybox'));
    await fsp.copyFile(parts.program, path.join(stage, 'bin', 'ferry-guest'));
    await fsp.copyFile(path.join(GUEST_SOURCE_DIR, 'init'), path.join(stage, 'init'));
    for (const file of ['bin/busybox', 'bin/ferry-guest', 'init']) await fsp.chmod(path.join(stage, file), 0o755);
    for (const m of parts.modules) await fsp.copyFile(m.file, path.join(stage, 'lib', 'modules', `${m.name}.ko`));
    await fsp.writeFile(path.join(stage, 'etc', 'ferry-modules'), parts.modules.map((m) => `${m.name} ${m.name}.ko\n`).join(''));
    await cpioGzip(parts.busybox, stage, tmp);
    await fsp.rename(tmp, target);
  } finally {
    await fsp.rm(stage, { recursive: true, force: true });
    await fsp.rm(tmp, { force: true });
  }
}

/** `busybox cpio -o -H newc` over every path in `dir` (there is no cpio binary), gzipped into `out`. */
async function cpioGzip(busybox: string, dir: string, out: string): Promise<void> {
  const names = await listTree(dir);
  const child = spawn(busybox, ['cpio', '-o', '-H', 'newc', '-R', '0:0'], { cwd: dir, stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', resolve);
  });
  child.stdin.end(names.join('\n') + '\n');
  await pipeline(child.stdout, createGzip({ level: 9 }), createWriteStream(out));
  const code = await exited;
  // busybox cpio prints the block count on stderr, as cpio does.
  if (code !== 0) throw new Error(`busybox cpio failed (exit ${code}): ${stderr.trim()}`);
}

async function listTree(root: string, rel = ''): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await fsp.readdir(path.join(root, rel), { withFileTypes: true })) {
    const name = rel ? `${rel}/${entry.name}` : entry.name;
    out.push(name);
    if (entry.isDirectory()) out.push(...(await listTree(root, name)));
  }
  return out;
}

/** The first busybox that is statically linked (an ELF without a PT_INTERP program header). */
export async function findStaticBusybox(): Promise<string | null> {
  for (const file of BUSYBOX_CANDIDATES) {
    if ((await isExecutable(file)) && (await isStaticElf(file))) return file;
  }
  return null;
}

async function isStaticElf(file: string): Promise<boolean> {
  const data = await fsp.readFile(file);
  if (data.length < 64 || data.toString('latin1', 0, 4) !== '\x7fELF' || data[4] !== 2) return false;
  const phoff = Number(data.readBigUInt64LE(0x20));
  const phentsize = data.readUInt16LE(0x36);
  const phnum = data.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    if (data.readUInt32LE(phoff + i * phentsize) === 3 /* PT_INTERP */) return false;
  }
  return true;
}
