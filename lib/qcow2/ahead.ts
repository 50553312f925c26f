// Work started a few items ahead of the one awaited, and taken in order: a deep chain's small
// reads (image opens, manifests) overlap, while each result is still judged in turn, so the
// first problem reported is the one a loop that awaited each item would have found.

export class Ahead<T> {
  /** Every item started so far, in order (a caller closes or settles them after a failure). */
  readonly started: Array<Promise<T>> = [];

  constructor(
    private readonly count: number,
    /** Items running at once: the one taken and the ones after it. */
    private readonly depth: number,
    private readonly start: (i: number) => Promise<T>,
  ) {}

  /** Item `i`, once the items after it up to the depth are started too. */
  take(i: number): Promise<T> {
    for (let j = this.started.length; j < Math.min(this.count, i + this.depth); j++) {
      const p = this.start(j);
      p.catch(() => {}); // taken in turn, or settled by the caller after a failure
      this.started.push(p);
    }
    return this.started[i]!;
  }

  /** Nothing started is still running once this resolves. */
  async settle(): Promise<void> {
    await Promise.allSettled(this.started);
  }
}
