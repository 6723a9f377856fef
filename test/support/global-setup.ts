/**
 * Jest global setup: one real Temporal dev server for the whole run (in-memory, free ports, with its
 * Web UI). Test files find it through FERRY_TEST_TEMPORAL_ADDRESS and the UI through
 * FERRY_TEST_TEMPORAL_UI, which jest workers inherit. If FERRY_TEST_TEMPORAL_ADDRESS is already set,
 * that server is used and nothing is started (set FERRY_TEST_TEMPORAL_UI too for the UI test).
 */
import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync } from 'node:fs';
import path from 'node:path';
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';
import { nodeEntryArgs } from '../../common/node-entry';
import {
  ensureTemporalCli,
  FERRY_SEARCH_ATTRIBUTES,
  freePort,
  startDevServer,
  type SearchAttributeTypeName,
} from '../../scripts/temporal-cli';

export const ADDRESS_ENV = 'FERRY_TEST_TEMPORAL_ADDRESS';
export const UI_ENV = 'FERRY_TEST_TEMPORAL_UI';
export const HANDLE_KEY = '__ferryTestTemporalServer';
export const PROVISION_KEY = '__ferryServerProvisioning';

export interface TestServerHandle {
  address: string;
  uiUrl: string | null;
  stop(): Promise<void>;
}

const log = (line: string): void => {
  process.stderr.write(`[temporal] ${line}\n`);
};

export default async function globalSetup(): Promise<void> {
  startServerProvisioning();
  if (process.env[ADDRESS_ENV]) {
    log(`using the Temporal server at ${process.env[ADDRESS_ENV]} (${ADDRESS_ENV})`);
    return;
  }
  const cli = await ensureTemporalCli({ log });
  const handle = cli.route === 'sdk' ? await startWithSdkDownload() : await startDevServer({ cliPath: cli.path, log: quietLog });
  process.env[ADDRESS_ENV] = handle.address;
  if (handle.uiUrl) process.env[UI_ENV] = handle.uiUrl;
  (globalThis as Record<string, unknown>)[HANDLE_KEY] = handle;
}

/**
 * The production-server test needs the Temporal server built from source (cold: minutes): start
 * `setup:temporal-server` now, in the background and niced, so the build runs while the other files
 * do; that test waits for it (the cache's install lock) and runs last (test/support/sequencer.js).
 * Only where that test runs: as root (network namespaces), or in CI.
 */
function startServerProvisioning(): void {
  const root = process.getuid?.() === 0;
  if (!root && !process.env.CI) return;
  const repo = path.resolve(__dirname, '..', '..');
  const logFile = path.join(repo, 'test-artifacts', 'setup-temporal-server.log');
  mkdirSync(path.dirname(logFile), { recursive: true });
  const out = openSync(logFile, 'w');
  const child = spawn('nice', ['-n', '10', process.execPath, ...nodeEntryArgs(path.join(repo, 'scripts', 'setup-temporal-server'))], { stdio: ['ignore', out, out], detached: true });
  closeSync(out);
  child.on('error', (err) => log(`setup:temporal-server did not start: ${err.message}`));
  log(`provisioning the production Temporal server in the background (pid ${child.pid}; progress in ${path.relative(repo, logFile)})`);
  (globalThis as Record<string, unknown>)[PROVISION_KEY] = child;
}

/** Server output is only shown with FERRY_TEST_TEMPORAL_LOG=1; it is part of any startup error anyway. */
function quietLog(line: string): void {
  if (process.env.FERRY_TEST_TEMPORAL_LOG) log(line);
}

async function startWithSdkDownload(): Promise<TestServerHandle> {
  // Loaded only here: it pulls in the SDK's native bridge, which the usual route does not need.
  const { TestWorkflowEnvironment } = await import('@temporalio/testing');
  const uiPort = await freePort();
  const env = await TestWorkflowEnvironment.createLocal({
    server: {
      ui: true,
      uiPort,
      searchAttributes: Object.entries(FERRY_SEARCH_ATTRIBUTES).map(([name, type]) => defineSearchAttributeKey(name, sdkType(type))),
    },
  });
  return { address: env.address, uiUrl: `http://127.0.0.1:${uiPort}`, stop: () => env.teardown() };
}

function sdkType(type: SearchAttributeTypeName): SearchAttributeType {
  const map: Record<SearchAttributeTypeName, SearchAttributeType> = {
    Keyword: SearchAttributeType.KEYWORD,
    Text: SearchAttributeType.TEXT,
    Int: SearchAttributeType.INT,
    Double: SearchAttributeType.DOUBLE,
    Bool: SearchAttributeType.BOOL,
    Datetime: SearchAttributeType.DATETIME,
    KeywordList: SearchAttributeType.KEYWORD_LIST,
  };
  return map[type];
}
