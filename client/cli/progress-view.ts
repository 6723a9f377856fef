// Live progress of a migration on a terminal (a cli-progress bar), ending with the report.
import cliProgress from 'cli-progress';
import type { MigrationHandle } from '../ferry-client';
import { formatRetry, initialProgress, type MigrationProgress, type MigrationReport } from '../../common/migration';

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/** "2.0 MiB/s"; "- /s" while the rate is not measured yet. */
export function formatRate(bytesPerSecond: number | null): string {
  return bytesPerSecond === null ? '- /s' : `${formatBytes(bytesPerSecond)}/s`;
}

function fields(p: MigrationProgress) {
  return {
    phase: p.phase.padEnd(17),
    // Sizes with the bytes sent so far: dirty rounds resend blocks, so sent can exceed the size.
    disk: `${formatBytes(p.disk.totalBytes)} (sent ${formatBytes(p.disk.sentBytes)})`,
    mem: `${formatBytes(p.memory.totalBytes)} (sent ${formatBytes(p.memory.sentBytes)})`,
    rate: formatRate(p.transferBytesPerSecond),
    dirty: `${p.disk.dirtyBlocks} blk ${p.memory.dirtyPages} pg`,
    etaText: p.etaSeconds === null ? '-' : `${p.etaSeconds}s`,
    retry: p.retrying ? ` | ${formatRetry(p.retrying)}` : '',
  };
}

/**
 * Follow a migration until it ends; draws a bar on a TTY and plain lines elsewhere. An aborted
 * `signal` stops following (the bar is cleared up) and rejects with the signal's reason; the
 * migration itself goes on.
 */
export async function followMigration(
  handle: MigrationHandle,
  opts: { stream?: NodeJS.WriteStream; intervalMs?: number; signal?: AbortSignal } = {},
): Promise<MigrationReport> {
  const stream = opts.stream ?? process.stderr;
  const bar = new cliProgress.SingleBar(
    {
      stream,
      format: '{phase} |{bar}| {percentage}% | disk {disk} | mem {mem} | {rate} | dirty {dirty} | ETA {etaText}{retry}',
      hideCursor: true,
      noTTYOutput: true,
      notTTYSchedule: 2000,
      barsize: 24,
    },
    cliProgress.Presets.shades_classic,
  );
  bar.start(100, 0, fields(initialProgress(handle.vmId)));
  let done = false;
  const result = handle.result().finally(() => (done = true));
  const stopped = new Promise<void>((resolve) => opts.signal?.addEventListener('abort', () => resolve(), { once: true }));
  let last = 0;
  let lastFields = fields(initialProgress(handle.vmId));
  while (!done) {
    if (opts.signal?.aborted) {
      result.catch(() => undefined);
      bar.stop();
      throw opts.signal.reason;
    }
    try {
      const p = await handle.progress();
      last = Math.max(last, p.percent);
      lastFields = fields(p);
      bar.update(last, lastFields);
    } catch {
      // the workflow may be between tasks; the next poll catches up
    }
    await Promise.race([result.catch(() => undefined), stopped, new Promise((r) => setTimeout(r, opts.intervalMs ?? 500))]);
  }
  try {
    const report = await result;
    bar.update(100, { ...lastFields, phase: report.outcome.padEnd(17), etaText: '0s', retry: '' });
    return report;
  } finally {
    bar.stop();
  }
}


export function formatReport(r: MigrationReport): string {
  const lines = [
    `${r.vmId}: ${r.outcome}${r.reason ? ` (${r.reason})` : ''}`,
    `  ${r.sourceHost} → ${r.destinationHost ?? '-'}  mode ${r.mode}${r.incremental ? ', incremental' : ''}  epoch ${r.epoch}`,
    `  total ${(r.totalMs / 1000).toFixed(2)} s   downtime ${r.downtimeMs ?? '-'} ms   postcopy ${r.postcopyMs} ms (${r.onDemandFetches} on-demand fetches)`,
    `  sent disk ${formatBytes(r.diskBytesSent)}, memory ${formatBytes(r.memoryBytesSent)}   rounds disk ${r.diskRounds}, memory ${r.memoryRounds}${r.throttled ? '   guest throttled' : ''}`,
  ];
  // The destination's decision is known once one prepared (a full copy always says why).
  const decided = r.incremental || r.incrementalFallbackReason !== undefined;
  const decision = decided ? `${incrementalLine(r.incremental, r.incrementalFallbackReason ?? null)}${r.incremental ? ` (${r.skippedBlocks} blocks skipped)` : ''}, ` : '';
  if (decision || r.blockBytes) lines.push(`  ${decision}${r.blockBytes ? `block size ${formatBytes(r.blockBytes)}` : ''}`.replace(/, $/, ''));
  if (r.coldMigration) lines.push('  cold migration: the VM was paused and stays paused (ferry vm resume to run it)');
  for (const f of r.failedDestinations) lines.push(`  destination ${f.host} failed: ${f.reason}`);
  if (r.resolution) lines.push(`  resolved: ${r.resolution.host} declared lost by ${r.resolution.by} at ${r.resolution.at}: ${r.resolution.reason}`);
  return lines.join('\n');
}

/** The destination's incremental decision, in words. */
export function incrementalLine(incremental: boolean, fallbackReason: string | null): string {
  if (incremental) return 'incremental: only the blocks written since the last migration';
  return `full copy${fallbackReason ? `: ${fallbackReason}` : ''}`;
}
