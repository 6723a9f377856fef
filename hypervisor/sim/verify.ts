// The simulator's oracle behind VmHandle.verify(): the guest runs on to a fixed operation count and
// halts; its disk and memory are compared with a reference run of the same guest that never migrated
// (DESIGN: byte-identical result). Every 4 KiB block that differs counts as a violation.
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { VerifyResult, VmSpec } from '../driver';
import { GUEST_BLOCK_BYTES } from './content';
import { referenceImage } from './guest';
import type { SimVmHandle } from './vm-handle';

/** Operations the guest runs past where it is before it halts (every workload reads and writes by then). */
export const VERIFY_MORE_OPS = 300;

export async function verifyAgainstReference(vm: SimVmHandle, spec: VmSpec): Promise<VerifyResult> {
  const before = await vm.status();
  if (!before.guest) throw new Error(`VM ${spec.vmId} has no guest yet (state ${before.state}): verify it where it runs`);
  const ops = before.guest.ops + VERIFY_MORE_OPS;
  await vm.runUntil(ops);
  const [actual, after] = [await vm.hashes(), await vm.status()];
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ferry-verify-'));
  try {
    const reference = await referenceImage(spec, ops, dir);
    const differing = await differingBlocks(vm, reference.file, spec.diskBytes);
    const memoryDiffers = actual.memory !== reference.memory;
    const readViolations = after.guest?.violations ?? 0;
    const details = [
      `halted at operation ${ops}`,
      differing.length > 0 ? `${differing.length} blocks differ from the reference run (first: ${differing.slice(0, 8).join(', ')})` : 'disk equal to the reference run',
      memoryDiffers ? 'memory differs from the reference run' : 'memory equal to the reference run',
      `${readViolations} guest reads saw stale data`,
    ].join('; ');
    return {
      checked: Math.ceil(spec.diskBytes / GUEST_BLOCK_BYTES),
      violations: differing.length + (memoryDiffers ? 1 : 0) + readViolations,
      method: 'sim: halted at an operation count, disk and memory compared with a reference run without migration',
      details,
    };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

async function differingBlocks(vm: SimVmHandle, referenceFile: string, diskBytes: number): Promise<number[]> {
  const disk = await vm.openDisk();
  const ref = await fs.open(referenceFile, 'r');
  const out: number[] = [];
  const chunk = 4 << 20;
  try {
    const theirs = Buffer.alloc(chunk);
    for (let at = 0; at < diskBytes; at += chunk) {
      const n = Math.min(chunk, diskBytes - at);
      const mine = await disk.read(at, n);
      await ref.read(theirs, 0, n, at);
      if (mine.equals(theirs.subarray(0, n))) continue;
      for (let b = 0; b < n; b += GUEST_BLOCK_BYTES) {
        const e = Math.min(n, b + GUEST_BLOCK_BYTES);
        if (!mine.subarray(b, e).equals(theirs.subarray(b, e))) out.push((at + b) / GUEST_BLOCK_BYTES);
      }
    }
  } finally {
    await disk.close();
    await ref.close();
  }
  return out;
}
