/** Helpers for test files that talk to the Temporal server started by jest's global setup. */
import { randomUUID } from 'node:crypto';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection } from '@temporalio/worker';

export const TEST_NAMESPACE = 'default';

export function testTemporalAddress(): string {
  const address = process.env.FERRY_TEST_TEMPORAL_ADDRESS;
  if (!address) {
    throw new Error('FERRY_TEST_TEMPORAL_ADDRESS is not set: run tests through jest (its global setup starts the server)');
  }
  return address;
}

export async function connectTestClient(): Promise<{ client: Client; connection: Connection; close(): Promise<void> }> {
  const connection = await Connection.connect({ address: testTemporalAddress() });
  const client = new Client({ connection, namespace: TEST_NAMESPACE });
  return { client, connection, close: () => connection.close() };
}

/** A worker-side connection to the test server; close it after the worker has stopped. */
export function connectTestWorkerConnection(): Promise<NativeConnection> {
  return NativeConnection.connect({ address: testTemporalAddress() });
}

/** Task queues (and workflow ids) unique to one test, so tests sharing the server never collide. */
export function uniqueTaskQueue(prefix = 'test'): string {
  return `${prefix}-${randomUUID()}`;
}
