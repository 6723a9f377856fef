// Token bucket on wire bytes. Sending may take the bucket into debt by one frame; the next frame then
// waits until the debt is repaid, so the long-run rate is exact whatever the frame size.
//
// Urgent frames do not wait for the bucket: they are charged to it (the frames behind them repay the
// debt, so the long-run rate stays the limit) and wait only for a bucket of their own, at the same
// rate with a burst of URGENT_BURST_SECONDS, so that urgent traffic alone cannot exceed the limit.
import { performance } from 'node:perf_hooks';
import { DataPlaneError } from './api';

const URGENT_BURST_SECONDS = 0.25;

export class TokenBucket {
  private rate: number | null = null;
  private tokens = 0;
  private urgentTokens = 0;
  private last = performance.now();

  constructor(bytesPerSecond: number | null | undefined) {
    this.setRate(bytesPerSecond ?? null);
  }

  get bytesPerSecond(): number | null {
    return this.rate;
  }

  setRate(bytesPerSecond: number | null): void {
    if (bytesPerSecond !== null && !(Number.isFinite(bytesPerSecond) && bytesPerSecond > 0)) {
      throw new DataPlaneError('bad_config', `bandwidth must be a positive number of bytes per second or null, got ${bytesPerSecond}`);
    }
    this.refill();
    this.rate = bytesPerSecond;
    this.tokens = Math.min(this.tokens, this.burst());
    this.urgentTokens = Math.min(this.urgentTokens, this.urgentBurst());
  }

  /** Takes n bytes and returns 0 if they may go now; otherwise returns the milliseconds to wait. */
  take(n: number, urgent = false): number {
    if (this.rate === null) return 0;
    this.refill();
    const own = urgent ? this.urgentTokens : this.tokens;
    // At most a second: a debt at a very low rate would overflow a timer (and the rate may change).
    if (own < 0) return Math.min(1000, Math.max(1, Math.ceil((-own / this.rate) * 1000)));
    this.tokens -= n;
    if (urgent) this.urgentTokens -= n;
    return 0;
  }

  private burst(): number {
    return this.rate === null ? 0 : Math.max(64 * 1024, this.rate * 0.05);
  }

  private urgentBurst(): number {
    return this.rate === null ? 0 : Math.max(64 * 1024, this.rate * URGENT_BURST_SECONDS);
  }

  private refill(): void {
    const now = performance.now();
    if (this.rate !== null) {
      const earned = ((now - this.last) / 1000) * this.rate;
      this.tokens = Math.min(this.burst(), this.tokens + earned);
      this.urgentTokens = Math.min(this.urgentBurst(), this.urgentTokens + earned);
    }
    this.last = now;
  }
}
