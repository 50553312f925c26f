// The undo stack of the running backup: newest first, each undo once, a failing undo
// does not stop the others, a released step is not undone.
import { describe, expect, it } from 'vitest';
import { UndoStack } from '../../lib/ops/undo.js';

function stack() {
  const lines: string[] = [];
  return { undo: new UndoStack({ file: '/dev/null', log: (m) => lines.push(m) }), lines };
}

describe('UndoStack', () => {
  it('runs the undos newest first, each once, and hands them the failure', async () => {
    const { undo } = stack();
    const ran: string[] = [];
    const failure = new Error('boom');
    undo.defer('folder', async (e) => void ran.push(`folder:${(e as Error).message}`));
    undo.defer('checkpoint', async () => void ran.push('checkpoint'));
    undo.defer('job', async () => void ran.push('job'));
    await undo.unwind(failure);
    await undo.unwind(failure);
    expect(ran).toEqual(['job', 'checkpoint', 'folder:boom']);
  });

  it('a released step is skipped; releasing twice is harmless', async () => {
    const { undo } = stack();
    const ran: string[] = [];
    undo.defer('a', async () => void ran.push('a'));
    const release = undo.defer('b', async () => void ran.push('b'));
    undo.defer('c', async () => void ran.push('c'));
    release();
    release();
    await undo.unwind(null);
    expect(ran).toEqual(['c', 'a']);
  });

  it('an undo that throws is logged and the rest still run', async () => {
    const { undo, lines } = stack();
    const ran: string[] = [];
    undo.defer('first', async () => void ran.push('first'));
    undo.defer('thaw the guest', async () => {
      throw new Error('agent gone');
    });
    await undo.unwind(null);
    expect(ran).toEqual(['first']);
    expect(lines).toEqual(['Warning: cleanup step "thaw the guest" failed: agent gone']);
  });
});
