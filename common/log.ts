import pino from 'pino';
import pretty from 'pino-pretty';

export type Logger = pino.Logger;

/** Structured JSON logs; readable (pino-pretty) when printed to a terminal or when FERRY_LOG_PRETTY=1. */
export function createLogger(bindings: Record<string, unknown> = {}, opts: { level?: string; destination?: number } = {}): Logger {
  const level = opts.level ?? process.env.FERRY_LOG_LEVEL ?? 'info';
  const fd = opts.destination ?? 1;
  const readable = process.env.FERRY_LOG_PRETTY === '1' || (process.env.FERRY_LOG_PRETTY !== '0' && fd === 1 && process.stdout.isTTY);
  if (readable) {
    return pino({ level, base: bindings }, pretty({ colorize: true, destination: fd, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' }));
  }
  return pino({ level, base: bindings }, pino.destination({ fd, sync: false }));
}
