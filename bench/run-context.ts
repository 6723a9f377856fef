// What every benchmark command shares: its log line, stopping what it started on a signal, and the
// machine and load it ran under (the `meta` of its JSON).
import os from 'node:os';

export interface RunContext {
  /** One line on stderr, stamped with the seconds since the start. */
  say(line: string): void;
  /** The `meta` of the JSON: when, how long, the command line, the load and the machine. */
  meta(): Record<string, unknown>;
  /** Seconds since the start. */
  elapsedS(): number;
}

export function startRun(): RunContext {
  const t0 = performance.now();
  const loadBefore = os.loadavg();
  const elapsedS = () => (performance.now() - t0) / 1000;
  return {
    say: (line) => process.stderr.write(`[${elapsedS().toFixed(0).padStart(4)} s] ${line}\n`),
    elapsedS,
    meta: () => {
      const durationS = elapsedS();
      return {
        started_at: new Date(Date.now() - durationS * 1000).toISOString(),
        duration_s: Math.round(durationS),
        command: process.argv.slice(2).join(' '),
        // Other processes compete for the same cores: a load above the core count makes every time longer.
        load_average: { before: loadBefore.map((x) => Number(x.toFixed(2))), after: os.loadavg().map((x) => Number(x.toFixed(2))) },
        machine: { cpus: os.cpus().length, cpu_model: os.cpus()[0]?.model ?? null, memory_gib: Math.round(os.totalmem() / 2 ** 30), platform: `${os.type()} ${os.release()}`, node: process.version },
      };
    },
  };
}

/** On SIGINT or SIGTERM: says so, runs `cleanup` (every process the benchmark started), exits 130 or 143. */
export function stopOnSignals(say: (line: string) => void, cleanup: () => Promise<void>): void {
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      say(`${signal}: stopping every process the benchmark started`);
      // Calls still waiting on Temporal fail once the connection closes; we are exiting anyway.
      process.on('uncaughtException', () => undefined);
      void cleanup().then(() => process.exit(signal === 'SIGINT' ? 130 : 143));
    });
  }
}

/** What a scenario started and must stop, also when a signal cuts it short: stopOnSignals' cleanup runs these. */
export class Running {
  private readonly stops = new Set<() => Promise<unknown>>();

  /** Registers `stop`; the returned function runs it (once) and forgets it. */
  add(stop: () => Promise<unknown>): () => Promise<void> {
    let done = false;
    const once = async () => {
      if (done) return;
      done = true;
      this.stops.delete(once);
      await stop().catch(() => undefined);
    };
    this.stops.add(once);
    return once;
  }

  async stopAll(): Promise<void> {
    for (const stop of [...this.stops].reverse()) await stop();
  }
}
