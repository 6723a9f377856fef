// A raw client of a VM's control socket, for tests that send it what no well-behaved client would.
import * as net from 'node:net';
import { FrameParser, type JsonObject } from '../../hypervisor/control/protocol';

export interface ControlExchange {
  /** Every JSON object the VM sent, the greeting first. */
  replies: JsonObject[];
  /** The VM closed the connection (after we half-closed ours). */
  closed: boolean;
}

/**
 * Writes `input` to the control socket, half-closes, and collects what comes back until the VM
 * closes the connection (or `timeoutMs` passes).
 */
export function controlExchange(socketPath: string, input: (Buffer | string)[], timeoutMs = 10_000): Promise<ControlExchange> {
  return new Promise((resolve) => {
    const sock = net.createConnection(socketPath);
    const parser = new FrameParser();
    const replies: JsonObject[] = [];
    let closed = false;
    const done = (): void => {
      clearTimeout(timer);
      sock.destroy();
      resolve({ replies, closed });
    };
    const timer = setTimeout(done, timeoutMs);
    sock.on('data', (c: Buffer) => {
      for (const e of parser.push(c)) if (e.type === 'frame') replies.push(e.json);
    });
    sock.on('error', () => undefined);
    sock.on('close', () => {
      closed = true;
      done();
    });
    for (const b of input) sock.write(b);
    sock.end();
  });
}

/** The error reply to the command with this id (or, for id null, the first error without one). */
export function errorReply(replies: JsonObject[], id: unknown): { class: string; desc: string } | undefined {
  return replies.find((r) => r.id === id && r.error)?.error as { class: string; desc: string } | undefined;
}
