// The order in which a migration takes its slots: one global order, so waiting never forms a cycle.
import { acquisitionOrder } from '../../workflows/slots';
import { CLUSTER_SCOPE, hostScope } from '../../workflows/definitions';

const scopes = (...s: string[]) => s.map((scope) => ({ scope }));

it('takes the cluster slot first, then hosts by name, whichever is source or destination', () => {
  const there = acquisitionOrder(scopes(CLUSTER_SCOPE, hostScope('b'), hostScope('a'))); // b -> a
  const back = acquisitionOrder(scopes(CLUSTER_SCOPE, hostScope('a'), hostScope('b'))); // a -> b
  expect(there.map((s) => s.scope)).toEqual([CLUSTER_SCOPE, 'host-a', 'host-b']);
  expect(back).toEqual(there);
});

it('orders by code units, not locale, so every worker agrees', () => {
  expect(acquisitionOrder(scopes(hostScope('b'), hostScope('B'), CLUSTER_SCOPE, hostScope('a-1'))).map((s) => s.scope)).toEqual([
    CLUSTER_SCOPE,
    'host-B',
    'host-a-1',
    'host-b',
  ]);
});
