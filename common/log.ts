import pino from 'pino';

export type Logger = pino.Logger;

/** Structured JSON logs; readable (pino-pretty) when printed to a terminal or when FERRY_LOG_PRETTY=1. */
export function createLogger(bindings: Record<string, unknown> = {}, opts: { level?: string; destination?: number } = {}): Logger {
  const level = opts.level ?? process.env.FERRY_LOG_LEVEL ?? 'info';
  const fd = opts.destination ?? 1;
  const pretty = process.env.FERRY_LOG_PRETTY === '1' || (process.env.FERRY_LOG_PRETTY !== '0' && fd === 1 && process.stdout.isTTY);
  if (pretty) {
    const pp = require('pino-pretty') as (o: object) => NodeJS.WritableStream;
    return pino({ level, base: bindings }, pp({ colorize: true, destination: fd, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' }));
  }
  return pino({ level, base: bindings }, pino.destination({ fd, sync: false }));
}
