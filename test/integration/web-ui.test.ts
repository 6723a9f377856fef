// The Temporal Web UI of the jest run's dev server, in headless Chromium (Debian's, driven by
// playwright-core; no browser download): a running migration is listed, and its page shows the
// phase in the current details, Ferry's search attributes and the memo.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { startCluster, testVm, uniqueHosts, waitForProgress } from '../support/cluster';
import type { LocalCluster } from '../../harness/cluster';
import type { FerryClient, MigrationHandle } from '../../client/ferry-client';
import { findChromium, HEADLESS_FLAGS, INSTALL_HINT } from '../../scripts/chromium';

const ARTIFACTS = path.resolve(__dirname, '..', '..', 'test-artifacts');
const [a, b] = uniqueHosts('ui-a', 'ui-b');
jest.setTimeout(300_000);

const executablePath = findChromium();
const uiUrl = process.env.FERRY_TEST_TEMPORAL_UI;
const missing = !executablePath
  ? `no Chromium found: ${INSTALL_HINT} (npm run setup:browser installs it when run as root)`
  : !uiUrl
    ? 'the Temporal server of this run has no Web UI (FERRY_TEST_TEMPORAL_UI is not set)'
    : null;
const inCi = Boolean(process.env.CI) && process.env.CI !== 'false';
if (missing && !inCi) process.stderr.write(`\n*** SKIPPED: the Web UI test cannot run: ${missing} ***\n\n`);

(missing && !inCi ? describe.skip : describe)('the Temporal Web UI', () => {
  let cluster: LocalCluster;
  let ferry: FerryClient;
  let browser: Browser;
  let handle: MigrationHandle | null = null;

  beforeAll(async () => {
    if (missing) throw new Error(`the Web UI test must run in CI, but ${missing}`);
    ({ cluster, ferry } = await startCluster([a, b]));
    browser = await chromium.launch({ executablePath: executablePath!, args: HEADLESS_FLAGS });
  });

  afterAll(async () => {
    if (handle) {
      await handle.abort('web UI test cleanup').catch(() => undefined);
      await handle.result().catch(() => undefined);
    }
    await browser?.close();
    await cluster?.stop();
  });

  /** The text of the page and of its frames (the UI renders markdown, such as the current details, in a frame). */
  async function pageText(page: Page): Promise<string> {
    const texts = await Promise.all(page.frames().map((f) => f.locator('body').innerText({ timeout: 5000 }).catch(() => '')));
    return texts.join('\n');
  }

  /** Wait until the page shows `text`, reloading now and then (visibility and the UI's own polling lag a little behind). */
  async function expectShown(page: Page, text: string | RegExp, timeoutMs = 90_000): Promise<void> {
    const started = Date.now();
    let reloaded = started;
    for (;;) {
      const shown = await pageText(page);
      if (typeof text === 'string' ? shown.includes(text) : text.test(shown)) return;
      if (Date.now() - started > timeoutMs) throw new Error(`the page ${page.url()} does not show ${String(text)}; it shows:\n${shown.slice(0, 3000)}`);
      if (Date.now() - reloaded > 20_000) {
        await page.reload();
        reloaded = Date.now();
      }
      await page.waitForTimeout(500);
    }
  }

  it('lists a running migration and shows its phase, search attributes and memo', async () => {
    const vm = testVm('randwrite', { opsPerSecond: 100, diskBytes: 16 * 1024 * 1024 });
    const workflowId = `migrate-${vm.vmId}`;
    await ferry.hostCommand(a, 'vmCreate', vm);
    // Slow (bandwidth-limited) and waiting for approval: it stays running, in a phase that holds still.
    handle = await ferry.migrate({ vmId: vm.vmId, sourceHost: a, destinationHosts: [b], bandwidthBytesPerSecond: 4 * 1024 * 1024, cutover: 'manual' });
    await waitForProgress(handle, 'awaiting-cutover', (p) => p.phase === 'awaiting-cutover');

    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    // The list, filtered by one of Ferry's search attributes, as an operator would.
    await page.goto(`${uiUrl}/namespaces/default/workflows?query=${encodeURIComponent(`FerryVmId="${vm.vmId}"`)}`);
    await expectShown(page, workflowId);
    const row = page.getByRole('row').filter({ hasText: workflowId });
    await expect(row.innerText()).resolves.toMatch(/running/i);
    await expect(row.innerText()).resolves.toContain('migrateVm');

    await page.getByRole('link', { name: workflowId }).first().click();
    await page.waitForURL(new RegExp(`/workflows/${workflowId}/`));
    await expectShown(page, /RUNNING/);

    await page.getByText('User Metadata', { exact: true }).click();
    await expectShown(page, `migrate ${vm.vmId} from ${a} to ${b} (tpm)`); // the summary
    await expectShown(page, `awaiting-cutover: disk copied; waiting for approval to switch over to ${b}`); // the current details
    await fs.mkdir(ARTIFACTS, { recursive: true });
    const screenshot = path.join(ARTIFACTS, 'web-ui-migration.png');
    await page.screenshot({ path: screenshot, fullPage: true });
    process.stdout.write(`Web UI screenshot: ${screenshot}\n`);

    await page.getByText('Search Attributes', { exact: true }).click();
    for (const attr of ['"FerryPhase": "awaiting-cutover"', `"FerryVmId": "${vm.vmId}"`, `"FerrySourceHost": "${a}"`, `"FerryDestinationHost": "${b}"`, '"FerryMode": "tpm"']) {
      await expectShown(page, attr);
    }
    await page.getByText('Memo', { exact: true }).click();
    await expectShown(page, `"vm": "${vm.vmId}"`);
    await expectShown(page, `"diskBytes": ${vm.diskBytes}`);

    await handle.abort('web UI test done');
    expect((await handle.result()).outcome).toBe('rolled-back');
    handle = null;
  });
});
