import { AsyncLocalStorage } from 'node:async_hooks';
import pino from 'pino';
import pretty from 'pino-pretty';

export type Logger = pino.Logger;

/** Fields that every log line written inside withLogContext carries (the migration and VM ids). */
export type LogContext = Record<string, string | number>;

const context = new AsyncLocalStorage<LogContext>();

/**
 * Run `fn` so that every line logged from it, and from anything it starts (timers, sessions,
 * background pushes), carries `fields`. One mechanism for activities and data-plane handlers alike,
 * so code deep inside need not pass child loggers around.
 */
export function withLogContext<T>(fields: LogContext, fn: () => T): T {
  return context.run({ ...context.getStore(), ...fields }, fn);
}

/** Structured JSON logs; readable (pino-pretty) when printed to a terminal or when FERRY_LOG_PRETTY=1. */
export function createLogger(bindings: Record<string, unknown> = {}, opts: { level?: string; destination?: number } = {}): Logger {
  const level = opts.level ?? process.env.FERRY_LOG_LEVEL ?? 'info';
  const fd = opts.destination ?? 1;
  const readable = process.env.FERRY_LOG_PRETTY === '1' || (process.env.FERRY_LOG_PRETTY !== '0' && fd === 1 && process.stdout.isTTY);
  const options: pino.LoggerOptions = { level, base: bindings, mixin: () => context.getStore() ?? {} };
  if (readable) {
    return pino(options, pretty({ colorize: true, destination: fd, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' }));
  }
  return pino(options, pino.destination({ fd, sync: false }));
}
