// Ahead: items started a bounded number ahead of the one taken, taken in order.
import { describe, expect, it } from 'vitest';
import { Ahead } from '../../lib/qcow2/ahead.js';

describe('Ahead', () => {
  it('starts at most `depth` items from the one taken, never past the count, each once', async () => {
    const starts: number[] = [];
    const a = new Ahead(6, 3, async (i) => {
      starts.push(i);
      return i * 10;
    });
    expect(await a.take(0)).toBe(0);
    expect(starts).toEqual([0, 1, 2]);
    expect(await a.take(1)).toBe(10);
    expect(starts).toEqual([0, 1, 2, 3]);
    expect(await a.take(5)).toBe(50);
    expect(await a.take(5)).toBe(50);
    expect(starts).toEqual([0, 1, 2, 3, 4, 5]);
    expect(a.started).toHaveLength(6);
  });

  it('a failure ahead is reported only when taken, and settle() waits for every started item', async () => {
    let finished = 0;
    const a = new Ahead(
      4,
      4,
      (i) =>
        new Promise<number>((resolve, reject) =>
          setTimeout(
            () => {
              finished++;
              if (i === 2) reject(new Error('item 2'));
              else resolve(i);
            },
            5 * (4 - i),
          ),
        ),
    );
    expect(await a.take(0)).toBe(0);
    expect(await a.take(1)).toBe(1);
    await expect(a.take(2)).rejects.toThrow('item 2');
    await a.settle();
    expect(finished).toBe(4);
  });
});
