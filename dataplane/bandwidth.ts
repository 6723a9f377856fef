// Token bucket on wire bytes. Sending may take the bucket into debt by one frame; the next frame then
// waits until the debt is repaid, so the long-run rate is exact whatever the frame size.
import { performance } from 'node:perf_hooks';
import { DataPlaneError } from './api';

export class TokenBucket {
  private rate: number | null = null;
  private tokens = 0;
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
  }

  /** Takes n bytes and returns 0 if they may go now; otherwise returns the milliseconds to wait. */
  take(n: number): number {
    if (this.rate === null) return 0;
    this.refill();
    if (this.tokens >= 0) {
      this.tokens -= n;
      return 0;
    }
    return Math.max(1, Math.ceil((-this.tokens / this.rate) * 1000));
  }

  private burst(): number {
    return this.rate === null ? 0 : Math.max(64 * 1024, this.rate * 0.05);
  }

  private refill(): void {
    const now = performance.now();
    if (this.rate !== null) this.tokens = Math.min(this.burst(), this.tokens + ((now - this.last) / 1000) * this.rate);
    this.last = now;
  }
}
