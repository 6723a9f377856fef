// What an operator reads while a migration runs (percent, rate, ETA), from acknowledged bytes only.
// Pure and deterministic, with no clock of its own: the workflow (which publishes its plan, its
// position in it and the bytes of every finished transfer) and the client (which adds the running
// transfer's last heartbeat) compute with the same functions. The README's "Progress" section says
// what each number means.
import type { MigrationProgress } from './migration';

/** The stages of a migration, in the order they run; each owns a band of the percent scale. */
export type ProgressStage = 'prepare' | 'disk-first-pass' | 'disk-rounds' | 'converging' | 'memory' | 'switchover' | 'postcopy' | 'finalize' | 'done';
export const PROGRESS_STAGES: readonly ProgressStage[] = ['prepare', 'disk-first-pass', 'disk-rounds', 'converging', 'memory', 'switchover', 'postcopy', 'finalize', 'done'];

/** What the migration has to move. */
export interface ProgressPlan {
  diskBytes: number;
  memoryBytes: number;
  blockBytes: number;
  /** tpm: the stale blocks are pushed after the switchover. */
  postcopy: boolean;
}

export interface ProgressPosition {
  stage: ProgressStage;
  /** In the stages made of rounds (disk-rounds, converging): the round under way, from 1. */
  round: number;
  /** Share of the step under way (a pass or a round) the destination acknowledged, 0..1. */
  stepDone: number;
}

/** Cumulative acknowledged bytes at a moment (ms since the epoch). */
export interface RateSample {
  atMs: number;
  bytes: number;
}

/** The bytes moved over this window are the rate; nothing moved in it reads 0. */
export const RATE_WINDOW_MS = 5_000;
/** Samples come with a heartbeat's lag: the window ends at the newest one while it is this recent. */
export const SAMPLE_FRESH_MS = 3_000;
/** A rate needs at least this much time behind it. */
const MIN_SPAN_MS = 1_000;

/** What the workflow publishes beside the progress, for the model. */
export interface ProgressTrack {
  plan: ProgressPlan;
  position: { stage: ProgressStage; round: number };
  /** Blocks the postcopy pushes (known at the switchover). */
  staleBlocks: number;
  /** After every finished transfer: the migration's acknowledged bytes so far (workflow time). */
  samples: RateSample[];
  /** The highest percent published so far: a later view never shows less. */
  floor: number;
}

/** The progress query's answer: the progress, and the track the client completes it from. */
export type PublishedProgress = MigrationProgress & { track: ProgressTrack };

/** A transfer activity's heartbeat: its position, and its own recent samples of `bytes` (host time). */
export interface StepProgress {
  cursor: number;
  bytes: number;
  items: number;
  samples?: RateSample[];
  /** The switchover activity (memory precopy, then the freeze): which part runs, and what each carried. */
  stage?: 'memory-precopy' | 'switchover';
  memoryBytes?: number;
  diskBytes?: number;
}

/** The running transfer, as the client sees it in Temporal's description of the workflow. */
export interface RunningTransfer {
  activity: string;
  heartbeat: StepProgress | null;
}

// Bands of the percent scale. The two passes share 80 by their sizes; stages of rounds fill their band
// halfway with each round (a round never completes the band, so more rounds never go backwards).
const BAND: Record<Exclude<ProgressStage, 'disk-first-pass' | 'memory' | 'done'>, number> = {
  prepare: 1,
  'disk-rounds': 5,
  converging: 5,
  switchover: 2,
  postcopy: 5,
  finalize: 2,
};
const PASSES = 80;
const ROUND_STAGES: readonly ProgressStage[] = ['disk-rounds', 'converging'];

function bandOf(plan: ProgressPlan, stage: ProgressStage): number {
  const total = plan.diskBytes + plan.memoryBytes;
  const diskShare = total > 0 ? plan.diskBytes / total : 0.5;
  switch (stage) {
    case 'disk-first-pass':
      return PASSES * diskShare;
    case 'memory':
      return PASSES * (1 - diskShare);
    case 'postcopy':
      return plan.postcopy ? BAND.postcopy : 0;
    case 'done':
      return 0;
    default:
      return BAND[stage];
  }
}

const clamp01 = (x: number): number => (Number.isFinite(x) ? Math.min(1, Math.max(0, x)) : 0);

/** Percent (0..100, not rounded) at a position of the plan; it only grows along the stages, rounds and steps. */
export function percentOf(plan: ProgressPlan, pos: ProgressPosition): number {
  if (pos.stage === 'done') return 100;
  const stages = PROGRESS_STAGES.slice(0, -1);
  const total = stages.reduce((sum, s) => sum + bandOf(plan, s), 0);
  let before = 0;
  for (const s of stages) {
    if (s === pos.stage) break;
    before += bandOf(plan, s);
  }
  let inside = clamp01(pos.stepDone);
  if (ROUND_STAGES.includes(pos.stage)) {
    const r = Math.max(0, Math.floor(pos.round));
    inside = r === 0 ? 0 : 1 - 2 ** -(r - 1) + 2 ** -r * inside;
  }
  return (100 * (before + bandOf(plan, pos.stage) * inside)) / total;
}

/** Whole percent for display: 100 only once done, never below `floor`. */
export function displayPercent(plan: ProgressPlan, pos: ProgressPosition, floor: number): number {
  return Math.max(floor, pos.stage === 'done' ? 100 : Math.min(99, Math.floor(percentOf(plan, pos))));
}

/**
 * Bytes per second over the last RATE_WINDOW_MS: 0 when nothing moved in it, null when there is not
 * yet a second of samples. Between two samples the bytes are taken to have moved evenly (a finished
 * transfer is a sample at its start and one at its end). The window ends at the newest sample while
 * it is fresh (the samples lag by up to a heartbeat), else at `nowMs`, so a transfer that went silent
 * decays to 0.
 */
export function transferRate(samples: readonly RateSample[], nowMs: number): number | null {
  const sorted = samples.filter((s) => s.atMs <= nowMs).sort((a, b) => a.atMs - b.atMs);
  if (sorted.length === 0) return null;
  // Acknowledged bytes only grow: a retried transfer that reports less again does not count down.
  let most = 0;
  const hull = sorted.map((s) => ({ atMs: s.atMs, bytes: (most = Math.max(most, s.bytes)) }));
  const newest = hull[hull.length - 1].atMs;
  const end = nowMs - newest <= SAMPLE_FRESH_MS ? newest : nowMs;
  const start = Math.max(end - RATE_WINDOW_MS, hull[0].atMs);
  if (end - start < MIN_SPAN_MS) return null;
  return Math.round(((bytesAt(hull, end) - bytesAt(hull, start)) * 1000) / (end - start));
}

/** The bytes at time t, linear between the samples around it. */
function bytesAt(hull: readonly RateSample[], t: number): number {
  let prev = hull[0];
  for (const s of hull) {
    if (s.atMs >= t) return s.atMs === prev.atMs ? s.bytes : prev.bytes + ((s.bytes - prev.bytes) * (t - prev.atMs)) / (s.atMs - prev.atMs);
    prev = s;
  }
  return prev.bytes;
}

/** The samples a rate at `nowMs` or later still needs: the window, and the last one before it. */
export function recentSamples(samples: readonly RateSample[], nowMs: number): RateSample[] {
  const sorted = [...samples].sort((a, b) => a.atMs - b.atMs);
  const first = sorted.findIndex((s) => s.atMs >= nowMs - RATE_WINDOW_MS - SAMPLE_FRESH_MS);
  return first < 0 ? sorted.slice(-1) : sorted.slice(Math.max(0, first - 1));
}

/** A heartbeat never goes back: a retried attempt reports from where its predecessor got to (the rest is the latest's). */
export function furthest<T extends StepProgress>(a: StepProgress, b: T): T {
  const { samples: _samples, ...latest } = b;
  return { ...latest, cursor: Math.max(a.cursor, b.cursor), bytes: Math.max(a.bytes, b.bytes), items: Math.max(a.items, b.items) } as T;
}

/** How far the running transfer got in its step, as the track's stage counts it. */
function stepDoneOf(track: ProgressTrack, running: RunningTransfer | null): number {
  const hb = running?.heartbeat;
  if (!hb) return 0;
  const { plan, position } = track;
  const diskShare = (blocks: number) => (plan.diskBytes > 0 ? (blocks * plan.blockBytes) / plan.diskBytes : 0);
  switch (running.activity) {
    case 'copyDiskFirstPass':
      return position.stage === 'disk-first-pass' ? diskShare(hb.cursor) : 0;
    case 'copyDiskDirty': // the cursor is where the round's scan of the disk is
      return ROUND_STAGES.includes(position.stage) ? diskShare(hb.cursor) : 0;
    case 'switchover': // the hypervisor's stream: its first iteration is about the memory's size
      return position.stage === 'memory' && plan.memoryBytes > 0 ? (hb.memoryBytes ?? 0) / plan.memoryBytes : 0;
    case 'postcopy':
      return position.stage === 'postcopy' && track.staleBlocks > 0 ? hb.items / track.staleBlocks : 0;
    default:
      return 0;
  }
}

/** What is left of the plan from this position (the rounds' part: the last dirty sets the workflow saw). */
function remainingOf(p: PublishedProgress, stepDone: number): { disk: number; memory: number } {
  const { plan, position, staleBlocks } = p.track;
  const left = 1 - clamp01(stepDone);
  switch (position.stage) {
    case 'prepare':
      return { disk: plan.diskBytes, memory: plan.memoryBytes };
    case 'disk-first-pass':
      return { disk: plan.diskBytes * left, memory: plan.memoryBytes };
    case 'disk-rounds':
      return { disk: p.disk.remainingBytes, memory: plan.memoryBytes };
    case 'memory':
      return { disk: p.disk.remainingBytes, memory: plan.memoryBytes * left };
    case 'converging':
      return { disk: p.disk.remainingBytes, memory: p.memory.remainingBytes };
    case 'postcopy':
      return { disk: staleBlocks * plan.blockBytes * left, memory: 0 };
    default:
      return { disk: 0, memory: 0 };
  }
}

/**
 * The progress to show at `nowMs`: the workflow's published progress, completed with the running
 * transfer's heartbeat (its bytes, its share of the step, its recent samples).
 */
export function liveProgress(published: PublishedProgress, running: RunningTransfer | null, nowMs: number): MigrationProgress {
  const hb = running?.heartbeat;
  // Memory precopy and the freeze run in one activity: its heartbeat says when the freeze began.
  const frozen = running?.activity === 'switchover' && hb?.stage === 'switchover' && published.track.position.stage === 'memory';
  const track: ProgressTrack = frozen ? { ...published.track, position: { stage: 'switchover', round: 0 } } : published.track;
  const { track: _published, ...progress } = published;
  const p: MigrationProgress = { ...progress, disk: { ...progress.disk }, memory: { ...progress.memory }, ...(frozen ? { phase: 'switchover' as const } : {}) };
  const stepDone = stepDoneOf(track, running);
  const samples = [...track.samples];
  if (running && hb) {
    if (running.activity === 'switchover') {
      p.memory.sentBytes += hb.memoryBytes ?? 0;
      p.disk.sentBytes += hb.diskBytes ?? 0;
    } else if (['copyDiskFirstPass', 'copyDiskDirty', 'postcopy'].includes(running.activity)) p.disk.sentBytes += hb.bytes;
    // The heartbeat's bytes are the running transfer's: they add to what had finished when it started.
    const base = samples.reduce((most, s) => Math.max(most, s.bytes), 0);
    for (const s of hb.samples ?? []) samples.push({ atMs: s.atMs, bytes: base + s.bytes });
  }
  p.percent = displayPercent(track.plan, { ...track.position, stepDone }, track.floor);
  const remaining = remainingOf({ ...published, track }, stepDone);
  p.disk.remainingBytes = Math.round(remaining.disk);
  p.memory.remainingBytes = Math.round(remaining.memory);
  const rate = transferRate(samples, nowMs);
  p.transferBytesPerSecond = rate;
  p.etaSeconds = rate !== null && rate > 0 ? Math.round((remaining.disk + remaining.memory) / rate) : null;
  return p;
}
