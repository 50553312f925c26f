// Compensation of a multi-step operation: each step that changes something outside our
// own files registers how to take it back; on failure (an interrupting signal included,
// which reaches the steps as INTERRUPTED) the undos run newest first, each one even
// when an earlier one failed. A step whose effect is settled releases its undo.
import type { Logger } from '../log.js';

export type Undo = (failure: unknown) => Promise<void>;

export class UndoStack {
  private readonly steps: Array<{ what: string; undo: Undo }> = [];

  constructor(private readonly logger: Logger) {}

  /** Register `undo`; the returned function releases it (the step needs no undo any more). */
  defer(what: string, undo: Undo): () => void {
    const step = { what, undo };
    this.steps.push(step);
    return () => {
      const i = this.steps.indexOf(step);
      if (i >= 0) this.steps.splice(i, 1);
    };
  }

  /** Run every registered undo, newest first, once. */
  async unwind(failure: unknown): Promise<void> {
    while (this.steps.length > 0) {
      const step = this.steps.pop()!;
      try {
        await step.undo(failure);
      } catch (e) {
        this.logger.log(`Warning: cleanup step "${step.what}" failed: ${(e as Error).message}`);
      }
    }
  }
}
