// Safe rebase through `qemu-img rebase` (no -u): qemu-img copies into the target
// whatever the skipped layers supplied before switching the backing reference.
// It is not crash-safe (killed after the switch, the copied clusters still in its
// cache are lost), so it is never stopped halfway: it runs in its own process group
// (a signal to ours does not reach it) under `shield`, which holds our own signals
// back until it is done; its deadline still applies.
import { NasbackupError } from '../errors.js';
import { ToolError } from '../clients/failure.js';
import type { QemuImgClient } from '../clients/qemu-img.js';
import type { RebaseEngine, RebaseRequest } from './types.js';

export class QemuImgRebaseEngine implements RebaseEngine {
  readonly name = 'qemu-img';

  constructor(
    private readonly qemuImg: QemuImgClient,
    /** Runs the rebase with signals held back (OpContext.shield). */
    private readonly shield: <T>(step: () => Promise<T>) => Promise<T> = (step) => step(),
  ) {}

  async rebase(req: RebaseRequest): Promise<void> {
    try {
      await this.shield(() =>
        this.qemuImg.rebase({ file: req.target, backing: req.newBackingName, backingFormat: req.newBackingFormat, ownProcessGroup: true }),
      );
    } catch (e) {
      if (!(e instanceof ToolError)) throw e;
      if (e.canceled) throw new NasbackupError('INTERRUPTED', `Interrupted while rebasing ${req.target}`);
      if (e.timedOut) {
        // Killed at its deadline: the one way it can still stop halfway. Say so.
        throw new NasbackupError(
          'COMMAND_TIMEOUT',
          `qemu-img rebase of ${req.target} passed its deadline and was killed; the image may be half-rebased: check it (nasbackup chain verify) before use`,
          { details: e.details },
        );
      }
      throw e;
    }
  }
}
