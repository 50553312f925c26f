// The native qcow2 rebase engine (lib/qcow2): in-chain safe rebase without qemu-img.
// Other shapes (new backing outside the chain) go to the fallback engine.
import { setFlagsFromString } from 'node:v8';
import { basename, dirname } from 'node:path';
import { refusalForQcow2 } from '../store/safety.js';
import { NasbackupError } from '../errors.js';
import { Qcow2Error, UNSUPPORTED_CODES, nativeRebase } from '../qcow2/index.js';
import type { RebaseEngine, RebaseRequest } from './types.js';

let youngGenerationCapped = false;

/**
 * Peak memory must not grow with the copy. V8 doubles the young generation whenever enough
 * has survived since the last growth, which a long copy always reaches: up to 16 MiB
 * semi-spaces, ~20–30 MiB more RSS. V8 reads this flag at each growth decision, so setting it
 * now takes effect; it is process-wide (hence here, in the process's engine, not in lib/qcow2),
 * and costs only more frequent (small) scavenges.
 */
export function capYoungGeneration(): void {
  if (youngGenerationCapped) return;
  youngGenerationCapped = true;
  try {
    setFlagsFromString('--semi-space-growth-factor=1');
  } catch {
    /* a runtime without it: memory is still bounded, only higher */
  }
}

export class NativeRebaseEngine implements RebaseEngine {
  readonly name = 'native';

  constructor(
    private readonly fallback: RebaseEngine,
    private readonly log: (message: string) => void = () => {},
    /** Throws once the operation must stop (a termination signal); checked before each copy request and between batches. */
    private readonly checkpoint: () => void = () => {},
  ) {}

  async rebase(req: RebaseRequest): Promise<void> {
    if (req.chainIndex < 1) {
      this.log(`engine native: ${req.newBacking} is not in the chain of ${req.target}; using ${this.fallback.name}`);
      return this.fallback.rebase(req);
    }
    try {
      await this.attempt(req);
    } catch (e) {
      throw nativeFailure(e, req);
    }
  }

  /**
   * The in-chain rebase, its errors as the engine raised them (Qcow2Error). `onPlanned` is
   * called before the first write: a failure before it left the target untouched.
   */
  async attempt(req: RebaseRequest, onPlanned?: () => void): Promise<void> {
    capYoungGeneration();
    const r = await nativeRebase({
      target: req.target,
      newBacking: req.newBacking,
      newBackingName: req.newBackingName,
      log: this.log,
      checkpoint: this.checkpoint,
      ...(onPlanned ? { onPlanned } : {}),
    });
    this.log(`engine native: ${req.target} rebased (${r.copiedBytes} bytes copied, ${r.zeroUnits} zero units, ${r.batches} batch(es))`);
  }
}

/** What a native rebase's failure is reported as: a refusal for damage or an unsafe input, else NATIVE_REBASE_FAILED. */
export function nativeFailure(e: unknown, req: RebaseRequest): unknown {
  if (!(e instanceof Qcow2Error)) return e;
  // Nothing half-done is visible: every stop point leaves a valid image with the old content.
  if (!UNSUPPORTED_CODES.has(e.code)) {
    const refusal = refusalForQcow2(e, `The chain of ${req.target}`, basename(dirname(dirname(req.target))));
    if (refusal) return refusal;
  }
  const why = UNSUPPORTED_CODES.has(e.code) ? 'is outside what the native engine supports (use --engine auto or qemu-img)' : 'failed';
  return new NasbackupError('NATIVE_REBASE_FAILED', `Native rebase of ${req.target} ${why} [${e.code}]`, { details: e.message });
}
