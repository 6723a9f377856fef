// Hosts on networks of their own (chaos --net netns): every host and the Temporal server in a network
// namespace, each data plane behind a Toxiproxy, links cut in the kernel. The cells of the issue's
// expected behaviour, each through the chaos runner with all its checks (one running copy, no stale
// read, reference hashes, a clear end, nothing left over), then no namespace, link or process left.
import { startChaosEnv, stopChaosEnv, type ChaosEnv } from '../../chaos/env';
import { runMatrix } from '../../chaos/matrix';
import { formatDetails, formatTable } from '../../chaos/table';
import type { FaultName } from '../../chaos/faults';
import type { PointName } from '../../chaos/points';
import { describeNetns } from '../support/netns';

jest.setTimeout(900_000);

const CELLS: [FaultName, PointName][] = [
  // A host cut off from Temporal during the postcopy: the host-to-host push goes on, the workflow completes after the link returns.
  ['isolate-source', 'postcopy'],
  ['isolate-dest', 'postcopy'],
  // The source-destination link cut before the commit: rolled back within the destination deadline.
  ['partition-dataplane', 'disk-precopy'],
  // ... and after it: the migration waits, and completes when the link returns.
  ['partition-dataplane', 'postcopy'],
];

describeNetns('hosts in network namespaces', () => {
  let env: ChaosEnv | null = null;

  afterAll(async () => {
    if (env) {
      const left = await stopChaosEnv(env);
      expect(left).toEqual([]);
    }
  });

  it('partitions and cuts: the expected end, 0 violations and one running VM in every cell', async () => {
    env = await startChaosEnv({ net: 'netns' });
    const cells = await runMatrix(env, { cells: CELLS, seeds: 1, destinationDeadlineSeconds: 10, tag: 'netns' });
    process.stderr.write(`${formatTable(cells)}\n${formatDetails(cells)}\n`);
    const failed = cells.filter((c) => !c.ok);
    if (failed.length > 0) throw new Error(`${failed.length} cell(s) failed:\n${formatTable(cells)}\n${formatDetails(cells)}`);
    expect(cells.map((c) => c.outcome)).toEqual(['completed', 'completed', 'rolled-back', 'completed']);
    expect(cells.every((c) => c.violations === 0 && c.runningCopies === 1 && c.hashesEqual === true)).toBe(true);
  });
});
