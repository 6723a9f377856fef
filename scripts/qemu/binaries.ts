// Where qemu-system-x86_64 and qemu-img come from: FERRY_QEMU (a directory holding both), else
// PATH, else (root with apt-get) Debian's qemu-system-x86 and qemu-utils. Both must be QEMU >= 7.2,
// the version the driver's QMP sequences were checked on.
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { findOnPath, isExecutable } from '../provisioning';
import { Apt } from './apt';

export const MIN_QEMU_VERSION = '7.2';
export const QEMU_PACKAGES = ['qemu-system-x86', 'qemu-utils'];
const ENV_VAR = 'FERRY_QEMU';
const SYSTEM = 'qemu-system-x86_64';
const IMG = 'qemu-img';

export type QemuRoute = 'env' | 'path' | 'apt';

export interface QemuBinaries {
  qemuSystem: string;
  qemuImg: string;
  qemuVersion: string;
  qemuRoute: QemuRoute;
}

export type Missing = { missing: string };

/** The binaries from FERRY_QEMU or PATH (installs nothing). */
export async function findQemuBinaries(route: QemuRoute = 'path'): Promise<QemuBinaries | Missing> {
  const dir = process.env[ENV_VAR];
  if (dir) return fromDir(path.resolve(dir), 'env');
  const system = await findOnPath(SYSTEM);
  const img = await findOnPath(IMG);
  if (!system || !img) {
    const absent = [!system && SYSTEM, !img && IMG].filter(Boolean).join(' and ');
    return { missing: `${absent} not found on PATH: install Debian's ${QEMU_PACKAGES.join(' and ')} (npm run setup:qemu does as root), or set ${ENV_VAR} to a directory holding ${SYSTEM} and ${IMG}` };
  }
  return checked(system, img, route);
}

/** findQemuBinaries, and when QEMU is not there, installs it with apt-get as root. */
export async function ensureQemuBinaries(apt: Apt): Promise<QemuBinaries | Missing> {
  const found = await findQemuBinaries();
  if (!('missing' in found) || process.env[ENV_VAR]) return found;
  if (!Apt.canInstall()) return { missing: `${found.missing} (installing needs root and apt-get)` };
  try {
    await apt.install(QEMU_PACKAGES);
  } catch (err) {
    return { missing: `${found.missing}; installing failed: ${err instanceof Error ? err.message : String(err)}` };
  }
  return findQemuBinaries('apt');
}

async function fromDir(dir: string, route: QemuRoute): Promise<QemuBinaries | Missing> {
  const system = path.join(dir, SYSTEM);
  const img = path.join(dir, IMG);
  for (const bin of [system, img]) {
    if (!(await isExecutable(bin))) return { missing: `${ENV_VAR}=${dir} has no executable ${path.basename(bin)}: point ${ENV_VAR} at a directory holding ${SYSTEM} and ${IMG}, or unset it` };
  }
  return checked(system, img, route);
}

async function checked(system: string, img: string, route: QemuRoute): Promise<QemuBinaries | Missing> {
  const versions: string[] = [];
  for (const bin of [system, img]) {
    let version: string;
    try {
      version = await readQemuVersion(bin);
    } catch (err) {
      return { missing: `${bin} --version failed (${err instanceof Error ? err.message : String(err)}): is it a working QEMU?` };
    }
    if (compareVersions(version, MIN_QEMU_VERSION) < 0) {
      return { missing: `${bin} is version ${version}, Ferry needs QEMU ${MIN_QEMU_VERSION} or later: install a newer QEMU, or set ${ENV_VAR} to a directory holding one` };
    }
    versions.push(version);
  }
  return { qemuSystem: system, qemuImg: img, qemuVersion: versions[0], qemuRoute: route };
}

/** Parses `QEMU emulator version 7.2.22 (Debian ...)` and `qemu-img version 7.2.22 (...)`. */
export async function readQemuVersion(bin: string): Promise<string> {
  const stdout = await new Promise<string>((resolve, reject) => {
    execFile(bin, ['--version'], { timeout: 30_000 }, (err, out) => (err ? reject(err) : resolve(out)));
  });
  const match = /version\s+(\d+\.\d+(?:\.\d+)?)/.exec(stdout);
  if (!match) throw new Error(`unexpected --version output: ${stdout.trim().split('\n')[0]}`);
  return match[1];
}

export function compareVersions(a: string, b: string): number {
  const pa = a.split('.').map(Number);
  const pb = b.split('.').map(Number);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}
