// Safe rebase through `qemu-img rebase` (no -u): qemu-img copies into the target
// whatever the skipped layers supplied before switching the backing reference.
import { NasbackupError } from '../errors.js';
import { ToolError } from '../clients/failure.js';
import type { QemuImgClient } from '../clients/qemu-img.js';
import type { RebaseEngine, RebaseRequest } from './types.js';

export class QemuImgRebaseEngine implements RebaseEngine {
  readonly name = 'qemu-img';

  constructor(private readonly qemuImg: QemuImgClient) {}

  async rebase(req: RebaseRequest): Promise<void> {
    try {
      await this.qemuImg.rebase({ file: req.target, backing: req.newBackingName, backingFormat: req.newBackingFormat });
    } catch (e) {
      if (!(e instanceof ToolError)) throw e;
      if (e.canceled) throw new NasbackupError('INTERRUPTED', `Interrupted while rebasing ${req.target}`);
      if (e.timedOut) throw new NasbackupError('COMMAND_TIMEOUT', e.message, { details: e.details });
      throw e;
    }
  }
}
