/**
 * Go programs that Ferry's tests and `ferry server --postgres` run, built once with `go install` from
 * the Go module proxy into the cache (`$FERRY_CACHE_DIR`, else `~/.cache/ferry`), under a lock so
 * that concurrent test files and `npm run setup:temporal-server` never build twice.
 *
 * - the Temporal server and its SQL schema tool (go.temporal.io/server), with the module's SQL schema
 *   files copied beside them;
 * - the Toxiproxy server (github.com/Shopify/toxiproxy/v2), the latency tool of the network harness.
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ferryCacheRoot, withLock } from './temporal-cli';
import { errorMessage, isExecutable, runStreaming, tempSibling, type LogFn } from './provisioning';

export interface GoToolSpec {
  /** Directory name in the cache. */
  name: string;
  module: string;
  version: string;
  /** Packages of the module to install, and the name each binary gets in the cache. */
  binaries: { pkg: string; bin: string }[];
  /** Directories of the module's source copied into the cache beside the binaries (schema files...). */
  copyFromModule?: string[];
}

export const TEMPORAL_SERVER_VERSION = '1.29.1';
export const TEMPORAL_SERVER: GoToolSpec = {
  name: 'temporal-server',
  module: 'go.temporal.io/server',
  version: TEMPORAL_SERVER_VERSION,
  binaries: [
    { pkg: 'go.temporal.io/server/cmd/server', bin: 'temporal-server' },
    { pkg: 'go.temporal.io/server/cmd/tools/sql', bin: 'temporal-sql-tool' },
  ],
  copyFromModule: ['schema/postgresql'],
};

// The module's server command lives in cmd/server (there is no cmd/toxiproxy-server in v2.5.0).
export const TOXIPROXY: GoToolSpec = {
  name: 'toxiproxy',
  module: 'github.com/Shopify/toxiproxy/v2',
  version: '2.5.0',
  binaries: [{ pkg: 'github.com/Shopify/toxiproxy/v2/cmd/server', bin: 'toxiproxy-server' }],
};

export interface GoTool {
  /** The cache directory of this tool and version: bin/ holds the binaries, plus the copied module files. */
  dir: string;
  bin(name: string): string;
  /** How it was found: already in the cache, or built now. */
  route: 'cache' | 'built';
}

interface Stamp {
  module: string;
  version: string;
  binaries: string[];
}

export function goToolDir(spec: GoToolSpec): string {
  return path.join(ferryCacheRoot(), `${spec.name}-${spec.version}`);
}

/** The tool from the cache, or null when it is not (completely) there. */
export async function cachedGoTool(spec: GoToolSpec): Promise<GoTool | null> {
  const dir = goToolDir(spec);
  const stamp = await fsp.readFile(path.join(dir, 'installed.json'), 'utf8').then((t) => JSON.parse(t) as Stamp, () => null);
  if (!stamp || stamp.module !== spec.module || stamp.version !== spec.version) return null;
  for (const b of spec.binaries) if (!(await isExecutable(path.join(dir, 'bin', b.bin)))) return null;
  return tool(dir, 'cache');
}

/**
 * The tool, built into the cache when missing. A cold build of the Temporal server takes about six
 * minutes on two cores; it runs under `nice` so that tests running meanwhile keep their CPU, and the
 * log gets a progress line every few seconds.
 */
export async function ensureGoTool(spec: GoToolSpec, opts: { log?: LogFn } = {}): Promise<GoTool> {
  const log = opts.log ?? (() => undefined);
  const cached = await cachedGoTool(spec);
  if (cached) return cached;
  const dir = goToolDir(spec);
  await fsp.mkdir(path.dirname(dir), { recursive: true });
  return withLock(`${dir}.lock`, log, async () => {
    const installed = await cachedGoTool(spec);
    if (installed) return installed;
    await checkGo(spec);
    const tmp = tempSibling(dir);
    try {
      await fsp.mkdir(path.join(tmp, 'bin'), { recursive: true });
      for (const b of spec.binaries) await goInstall(spec, b, tmp, log);
      for (const rel of spec.copyFromModule ?? []) {
        const from = path.join(await moduleDir(spec), rel);
        await fsp.cp(from, path.join(tmp, rel), { recursive: true });
        // Module cache files are read-only; the cache copy must stay removable.
        await chmodTree(path.join(tmp, rel));
      }
      const stamp: Stamp = { module: spec.module, version: spec.version, binaries: spec.binaries.map((b) => b.bin) };
      await fsp.writeFile(path.join(tmp, 'installed.json'), `${JSON.stringify(stamp, null, 2)}\n`);
      await fsp.rm(dir, { recursive: true, force: true });
      await fsp.rename(tmp, dir);
    } finally {
      await fsp.rm(tmp, { recursive: true, force: true });
    }
    return tool(dir, 'built');
  });
}

function tool(dir: string, route: GoTool['route']): GoTool {
  return { dir, bin: (name) => path.join(dir, 'bin', name), route };
}

async function checkGo(spec: GoToolSpec): Promise<void> {
  const ok = await new Promise<boolean>((resolve) => execFile('go', ['version'], (err) => resolve(!err)));
  if (!ok) {
    throw new Error(
      `go not found: ${spec.module}@v${spec.version} is built with \`go install\` from the Go module proxy. ` +
        'Install Go (Debian: apt-get install golang-go, or https://go.dev/dl) and run again',
    );
  }
}

async function goInstall(spec: GoToolSpec, b: { pkg: string; bin: string }, into: string, log: LogFn): Promise<void> {
  const gobin = path.join(into, `gobin-${b.bin}`);
  const started = performance.now();
  let compiled = 0;
  let lastReport = started;
  log(`building ${b.pkg}@v${spec.version} with go install (cold: minutes; cached afterwards in ${goToolDir(spec)})`);
  const result = await runStreaming('nice', ['-n', '10', 'go', 'install', '-v', `${b.pkg}@v${spec.version}`], {
    env: { ...process.env, GOBIN: gobin, GO111MODULE: 'on', GOFLAGS: [process.env.GOFLAGS, '-buildvcs=false'].filter(Boolean).join(' ') },
    // `go install -v` names every package it compiles: count them, and say how far it is now and then.
    log: (line) => {
      if (line.startsWith('go: downloading')) return;
      compiled++;
      const now = performance.now();
      if (now - lastReport > 15_000) {
        lastReport = now;
        log(`  ${b.bin}: ${compiled} packages compiled, ${((now - started) / 1000).toFixed(0)} s`);
      }
    },
  });
  if (result.code !== 0) {
    throw new Error(
      `go install ${b.pkg}@v${spec.version} failed (exit ${result.code}): check access to the Go module proxy (GOPROXY) ` +
        `and the disk space of the Go build cache. Last output:\n${result.tail.join('\n')}`,
    );
  }
  const built = path.join(gobin, path.basename(b.pkg));
  await fsp.rename(built, path.join(into, 'bin', b.bin));
  await fsp.rm(gobin, { recursive: true, force: true });
  log(`  ${b.bin}: built in ${((performance.now() - started) / 1000).toFixed(0)} s`);
}

/** Where `go` keeps the module's source (it is there after `go install` of one of its packages). */
async function moduleDir(spec: GoToolSpec): Promise<string> {
  const out = await new Promise<string>((resolve, reject) =>
    execFile('go', ['env', 'GOMODCACHE'], (err, stdout) => (err ? reject(err) : resolve(stdout.trim()))),
  ).catch((err: unknown) => {
    throw new Error(`go env GOMODCACHE failed: ${errorMessage(err)}`);
  });
  // The module cache escapes capital letters as !lowercase.
  const escaped = spec.module.replace(/[A-Z]/g, (c) => `!${c.toLowerCase()}`);
  return path.join(out, `${escaped}@v${spec.version}`);
}

async function chmodTree(dir: string): Promise<void> {
  await fsp.chmod(dir, 0o755);
  for (const entry of await fsp.readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) await chmodTree(p);
    else await fsp.chmod(p, 0o644);
  }
}
