// Engine selection for safe rebases: --engine / NASBACKUP_ENGINE = auto | native | qemu-img.
// auto takes the native engine only when the rebase is the in-chain shape, every image
// involved is inside the supported feature set (a dry run of the native planner: every
// check, no write), and no QEMU process holds any of them (OFD locks in /proc/locks).
// It falls back to qemu-img only when the native engine says a valid feature is unsupported:
// damage or an unsafe input found by the dry run is refused (qemu-img would copy zeros
// where the data was, or follow what it should not).
import { basename, dirname } from 'node:path';
import { refusalForQcow2 } from '../store/safety.js';
import { NasbackupError } from '../errors.js';
import { readChain, Qcow2Error, UNSUPPORTED_CODES, nativeRebase } from '../qcow2/index.js';
import { ProcLocksProbe, type LockProbe } from './locks.js';
import { NativeRebaseEngine, nativeFailure } from './native.js';
import { ENGINE_MODES, type EngineMode, type RebaseEngine, type RebaseRequest } from './types.js';

export { ENGINE_MODES, type EngineMode };
export const DEFAULT_ENGINE: EngineMode = 'auto';

export function parseEngineMode(v: string, what = '--engine'): EngineMode {
  if ((ENGINE_MODES as readonly string[]).includes(v)) return v as EngineMode;
  throw new NasbackupError('INVALID_ARGUMENT', `Invalid ${what}: ${v} (expected auto, native or qemu-img)`);
}

export interface Eligibility {
  native: boolean;
  reason: string;
  /** Set when no engine may run: the dry run found damage or an unsafe input. */
  refusal?: NasbackupError;
}

/** The VM name of a backup file `<mount>/<vm>/<timestamp>/<file>`, for messages. */
function vmOf(target: string): string {
  return basename(dirname(dirname(target)));
}

/**
 * Can this rebase run natively? Never throws: an unsupported feature, a held image or
 * another shape means qemu-img; anything else the dry run refuses comes back as `refusal`.
 */
export async function nativeEligibility(req: RebaseRequest, probe: LockProbe): Promise<Eligibility> {
  if (req.chainIndex < 1) return { native: false, reason: 'the new backing is not in the target’s chain' };
  let involved: string[];
  try {
    involved = await involvedImages(req);
    await nativeRebase({ target: req.target, newBacking: req.newBacking, newBackingName: req.newBackingName, dryRun: true });
  } catch (e) {
    return planFailure(e, req);
  }
  return lockVerdict(await probe.held(involved));
}

const NATIVE_REASON = 'in-chain rebase, supported features, no QEMU lock';

/** The target and the layers down to the new backing (what a rebase reads or writes). */
async function involvedImages(req: RebaseRequest): Promise<string[]> {
  const chain = await readChain(req.target);
  return chain.layers.slice(0, req.chainIndex + 1).map((l) => l.path);
}

function lockVerdict(held: string[] | null): Eligibility {
  if (held === null) return { native: false, reason: 'cannot read /proc/locks to rule out a running QEMU' };
  if (held.length) return { native: false, reason: `held by a QEMU process (OFD lock): ${held.join(', ')}` };
  return { native: true, reason: NATIVE_REASON };
}

/** A planning failure (nothing written yet): an unsupported feature means qemu-img, anything else is refused. */
function planFailure(e: unknown, req: RebaseRequest): Eligibility {
  const reason = e instanceof Qcow2Error ? `${e.code}: ${e.message}` : `native planner failed: ${(e as Error).message}`;
  if (e instanceof Qcow2Error && UNSUPPORTED_CODES.has(e.code)) return { native: false, reason };
  const refusal =
    (e instanceof Qcow2Error ? refusalForQcow2(e, `The chain of ${req.target}`, vmOf(req.target)) : null) ??
    new NasbackupError('NATIVE_REBASE_FAILED', `Native rebase planning for ${req.target} failed, refusing to hand it to qemu-img`, {
      details: reason,
    });
  return { native: false, reason, refusal };
}

export class AutoRebaseEngine implements RebaseEngine {
  readonly name = 'auto';
  private readonly native: NativeRebaseEngine;

  constructor(
    private readonly qemuImg: RebaseEngine,
    private readonly log: (message: string) => void = () => {},
    private readonly probe: LockProbe = new ProcLocksProbe(),
    checkpoint: () => void = () => {},
  ) {
    this.native = new NativeRebaseEngine(qemuImg, log, checkpoint);
  }

  async rebase(req: RebaseRequest): Promise<void> {
    // The usual case walks the chain's metadata once: with no QEMU lock on the images, the
    // native rebase itself plans (every check of the dry run) and, until its first write, a
    // failure is judged as the dry run's would be.
    const involved = req.chainIndex < 1 ? null : await involvedImages(req).catch(() => null);
    if (involved && lockVerdict(await this.probe.held(involved)).native) {
      let planned = false;
      try {
        await this.native.attempt(req, () => {
          planned = true;
          this.log(`engine auto: native for ${req.target} (${NATIVE_REASON})`);
        });
        return;
      } catch (e) {
        if (planned) throw nativeFailure(e, req);
        return this.decide(req, planFailure(e, req));
      }
    }
    return this.decide(req, await nativeEligibility(req, this.probe));
  }

  private decide(req: RebaseRequest, e: Eligibility): Promise<void> {
    if (e.refusal) {
      this.log(`engine auto: refused for ${req.target} (${e.reason})`);
      throw e.refusal;
    }
    this.log(`engine auto: ${e.native ? 'native' : 'qemu-img'} for ${req.target} (${e.reason})`);
    return e.native ? this.native.rebase(req) : this.qemuImg.rebase(req);
  }
}

/** The engine for a mode; `qemuImg` is the qemu-img engine (also the fallback). */
export function selectEngine(
  mode: EngineMode,
  qemuImg: RebaseEngine,
  log: (message: string) => void = () => {},
  probe: LockProbe = new ProcLocksProbe(),
  checkpoint: () => void = () => {},
): RebaseEngine {
  switch (mode) {
    case 'qemu-img':
      return qemuImg;
    case 'native':
      return new NativeRebaseEngine(qemuImg, log, checkpoint);
    case 'auto':
      return new AutoRebaseEngine(qemuImg, log, probe, checkpoint);
  }
}
