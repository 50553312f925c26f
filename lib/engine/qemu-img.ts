// Safe rebase through `qemu-img rebase` (no -u): qemu-img copies into the target
// whatever the skipped layers supplied before switching the backing reference.
import { NasbackupError } from '../errors.js';
import { failureText, succeeded } from '../exec.js';
import type { QemuImgClient } from '../clients/qemu-img.js';
import type { RebaseEngine, RebaseRequest } from './types.js';

export class QemuImgRebaseEngine implements RebaseEngine {
  readonly name = 'qemu-img';

  constructor(private readonly qemuImg: QemuImgClient) {}

  async rebase(req: RebaseRequest): Promise<void> {
    const r = await this.qemuImg.rebase({
      file: req.target,
      backing: req.newBackingName,
      backingFormat: req.newBackingFormat,
    });
    if (succeeded(r)) return;
    if (r.canceled) throw new NasbackupError('INTERRUPTED', `Interrupted while rebasing ${req.target}`);
    throw new NasbackupError(
      r.timedOut ? 'COMMAND_TIMEOUT' : 'QEMU_IMG_FAILED',
      `qemu-img rebase failed for ${req.target} onto ${req.newBackingName}`,
      { details: failureText(r) },
    );
  }
}
