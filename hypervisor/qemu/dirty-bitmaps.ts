// Ferry's block-bitmaps on a QEMU disk node, with successor semantics (DESIGN invariant 2).
//
// A logical bitmap NAME is a set of QEMU dirty bitmaps `NAME.N` on the raw node `disk0`: exactly one
// records (the newest N), and at most one older, disabled one is *pending* (handed out by a snapshot,
// not yet acknowledged). A snapshot is one QMP transaction that adds `NAME.(R+1)`, disables `NAME.R`,
// merges the pending `NAME.P` into it and removes `NAME.P`: every write lands in exactly one bitmap,
// and the pending set is the union of everything not acknowledged. Its bits are read over QEMU's NBD
// server (`qemu:dirty-bitmap:NAME.R`). The state lives in QEMU's names, so a restarted agent finds it
// again; a QEMU restart loses it (raw images cannot keep bitmaps), which reads as "no bitmap".
import type { BitmapInfo, BitmapSnapshot } from '../driver';
import { HypervisorError } from '../errors';
import type { DiskExports } from './disk-exports';
import type { QmpClient as Qmp } from './qmp/client';

import { DISK_NODE } from './command-line';

interface QemuBitmap {
  name: string;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  inconsistent?: boolean;
  count: number;
  granularity: number;
}

interface Generation {
  n: number;
  bitmap: QemuBitmap;
}

const physical = (name: string, n: number): string => `${name}.${n}`;

function parse(name: string): { logical: string; n: number } | null {
  const m = /^(.+)\.(\d+)$/.exec(name);
  return m ? { logical: m[1], n: Number(m[2]) } : null;
}

export class DirtyBitmaps {
  /** One bitmap operation at a time per VM: a snapshot is several QMP and NBD steps. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly qmp: Qmp,
    private readonly exports: DiskExports,
    private readonly diskBytes: number,
  ) {}

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async all(): Promise<Map<string, Generation[]>> {
    const nodes = await this.qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: QemuBitmap[] }[]>('query-named-block-nodes', { flat: true });
    const node = nodes.find((n) => n['node-name'] === DISK_NODE);
    if (!node) throw new HypervisorError('GenericError', `QEMU has no block node ${DISK_NODE}: the VM was not started by Ferry`);
    const out = new Map<string, Generation[]>();
    for (const b of node['dirty-bitmaps'] ?? []) {
      const p = parse(b.name);
      if (!p) continue;
      const list = out.get(p.logical) ?? [];
      list.push({ n: p.n, bitmap: b });
      out.set(p.logical, list);
    }
    for (const list of out.values()) list.sort((a, b) => a.n - b.n);
    return out;
  }

  private async generations(name: string): Promise<Generation[]> {
    return (await this.all()).get(name) ?? [];
  }

  add(name: string, blockBytes: number): Promise<void> {
    return this.serial(async () => {
      const existing = await this.generations(name);
      if (existing.length > 0) {
        if (existing[0].bitmap.granularity !== blockBytes) {
          throw new HypervisorError('BitmapExists', `bitmap ${name} exists at ${existing[0].bitmap.granularity}-byte blocks: remove it first or pick another name`);
        }
        return;
      }
      await this.qmp.execute('block-dirty-bitmap-add', { node: DISK_NODE, name: physical(name, 1), granularity: blockBytes, persistent: false });
    });
  }

  remove(name: string): Promise<void> {
    return this.serial(async () => {
      await this.exports.dropBitmapExports(name);
      for (const g of await this.generations(name)) {
        await this.qmp.execute('block-dirty-bitmap-remove', { node: DISK_NODE, name: physical(name, g.n) });
      }
    });
  }

  async list(): Promise<BitmapInfo[]> {
    const out: BitmapInfo[] = [];
    for (const [name, gens] of await this.all()) {
      const recording = gens.find((g) => g.bitmap.recording);
      const pending = gens.filter((g) => !g.bitmap.recording);
      const granularity = gens[0].bitmap.granularity;
      out.push({
        name,
        blockBytes: granularity,
        persistent: false,
        valid: recording !== undefined && gens.every((g) => !g.bitmap.inconsistent),
        dirtyCount: Math.ceil((recording?.bitmap.count ?? 0) / granularity),
        pendingCount: Math.ceil(pending.reduce((n, g) => n + g.bitmap.count, 0) / granularity),
      });
    }
    return out;
  }

  snapshot(name: string): Promise<BitmapSnapshot> {
    return this.serial(async () => {
      await this.exports.dropBitmapExports(name); // left by an interrupted earlier snapshot: an exported bitmap is busy
      const gens = await this.generations(name);
      const recording = gens.filter((g) => g.bitmap.recording);
      if (recording.length !== 1) {
        throw new HypervisorError('BitmapNotFound', `no recording bitmap ${name} on ${DISK_NODE}: add it with addBitmap first`);
      }
      const r = recording[0].n;
      const granularity = recording[0].bitmap.granularity;
      const pending = gens.filter((g) => !g.bitmap.recording);
      const actions: object[] = [
        { type: 'block-dirty-bitmap-add', data: { node: DISK_NODE, name: physical(name, r + 1), granularity, persistent: false } },
        { type: 'block-dirty-bitmap-disable', data: { node: DISK_NODE, name: physical(name, r) } },
      ];
      for (const p of pending) {
        actions.push({ type: 'block-dirty-bitmap-merge', data: { node: DISK_NODE, target: physical(name, r), bitmaps: [physical(name, p.n)] } });
        actions.push({ type: 'block-dirty-bitmap-remove', data: { node: DISK_NODE, name: physical(name, p.n) } });
      }
      await this.qmp.execute('transaction', { actions });
      const bits = await this.exports.readBitmap(physical(name, r), granularity, this.diskBytes);
      return { generation: r, blockBytes: granularity, bits, count: popcount(bits) };
    });
  }

  ack(name: string, generation: number): Promise<void> {
    return this.serial(async () => {
      const pending = (await this.generations(name)).filter((g) => !g.bitmap.recording);
      const latest = pending[pending.length - 1];
      if (!latest || latest.n !== generation) return; // an older (superseded) snapshot: nothing to drop
      await this.qmp.execute('block-dirty-bitmap-remove', { node: DISK_NODE, name: physical(name, generation) });
    });
  }
}

function popcount(bits: Buffer): number {
  let n = 0;
  for (const byte of bits) {
    let v = byte;
    while (v) {
      v &= v - 1;
      n++;
    }
  }
  return n;
}
