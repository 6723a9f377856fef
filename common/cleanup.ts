/**
 * What a step acquired (a VM connection, an open image, a data-plane session), released in reverse
 * order when the step ends, also when a later acquisition failed. A retried step must not leave one
 * connection or descriptor behind per attempt.
 */
export class Cleanup {
  private readonly releases: (() => unknown)[] = [];

  add<T>(resource: T, release: (r: T) => unknown): T {
    this.releases.push(() => release(resource));
    return resource;
  }

  async run(): Promise<void> {
    while (this.releases.length > 0) {
      try {
        await this.releases.pop()!();
      } catch {
        // releasing is best effort: the step's own error (or result) is what counts
      }
    }
  }
}
