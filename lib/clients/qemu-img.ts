// qemu-img behind a small typed client: parsed values or a coded ToolError (qemu-img's
// stderr as details). Every call has a deadline; the `info` parser stays private.
import { failureText, succeeded, type Runner, type RunResult } from '../exec.js';
import { ToolError } from './failure.js';

export interface RebaseArgs {
  file: string;
  backing: string;
  backingFormat: string;
  unsafe?: boolean;
  /** Must not stop halfway: its own process group (our signals do not reach it), and it finishes even if we are killed. */
  ownProcessGroup?: boolean;
}

function rebaseArgs(a: RebaseArgs): string[] {
  return ['rebase', ...(a.unsafe ? ['-u'] : []), '-b', a.backing, '-F', a.backingFormat, a.file];
}

/** A persistent bitmap as `qemu-img info` lists it: `auto` = recording, `in-use` = left inconsistent by a crash. */
export interface ImageBitmap {
  name: string;
  flags: string[];
  /** Guest bytes per bit, as qemu-img reports it (null if it does not). */
  granularity: number | null;
}

/** The bitmaps of a qcow2 image from `qemu-img info --output=json`. */
function parseImageBitmaps(text: string): ImageBitmap[] {
  const info = JSON.parse(text) as { 'format-specific'?: { data?: { bitmaps?: unknown } } };
  const list = info['format-specific']?.data?.bitmaps ?? [];
  if (!Array.isArray(list)) throw new Error('qemu-img info: bitmaps is not a list');
  return list.map((b: { name?: unknown; flags?: unknown; granularity?: unknown }) => ({
    name: String(b.name),
    flags: Array.isArray(b.flags) ? b.flags.map(String) : [],
    granularity: typeof b.granularity === 'number' ? b.granularity : null,
  }));
}

/** `qemu-img check`'s answer: its exit code is the verdict (3: only leaked clusters). */
export type CheckResult = { kind: 'clean' } | { kind: 'leaks' } | { kind: 'failed'; exitCode: number | null; message: string };

export class QemuImgClient {
  constructor(
    private readonly runner: Runner,
    private readonly binary: string,
    private readonly timeoutMs: number,
  ) {}

  private run(args: string[], opts: { ownProcessGroup?: boolean; timeoutMs?: number } = {}): Promise<RunResult> {
    // A rebase that must not stop halfway also outlives a SIGKILL of ours (lib/exec.ts).
    return this.runner.run(this.binary, args, {
      timeoutMs: opts.timeoutMs ?? this.timeoutMs,
      ...(opts.ownProcessGroup ? { ownProcessGroup: true, finishIfWeDie: true } : {}),
    });
  }

  /** Throws QEMU_IMG_FAILED; `canceled`/`timedOut` on the error let a caller word it otherwise. */
  async rebase(a: RebaseArgs): Promise<void> {
    const r = await this.run(rebaseArgs(a), { ownProcessGroup: a.ownProcessGroup ?? false });
    if (!succeeded(r)) throw new ToolError('QEMU_IMG_FAILED', `qemu-img rebase failed for ${a.file} onto ${a.backing}`, r, failureText(r));
  }

  /**
   * Copy a disk into a new qcow2 (the source format is given, never probed). `parallel`:
   * -m 16 -W, 16 coroutines with out-of-order writes (the default is 8, in order), what keeps
   * a raw, RBD or block-device source streaming; the output is the same image. `compress`:
   * compressed clusters (-c; readable by every qcow2 reader, a valid base of a chain);
   * `rateBytesPerSec`: qemu-img's own I/O rate limit (-r); `timeoutMs`: a deadline of its own.
   */
  async convert(
    src: string,
    srcFormat: string,
    dst: string,
    opts: { parallel?: boolean; compress?: boolean; rateBytesPerSec?: number | null; timeoutMs?: number } = {},
  ): Promise<void> {
    const extra = [
      ...(opts.parallel ? ['-m', '16', '-W'] : []),
      ...(opts.compress ? ['-c'] : []),
      ...(opts.rateBytesPerSec ? ['-r', String(Math.round(opts.rateBytesPerSec))] : []),
    ];
    const r = await this.run(
      ['convert', ...extra, '-f', srcFormat, '-O', 'qcow2', src, dst],
      opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {},
    );
    if (succeeded(r)) return;
    if (r.canceled) throw new ToolError('INTERRUPTED', `Interrupted while copying ${src}`, r, '');
    throw new ToolError(r.timedOut ? 'COMMAND_TIMEOUT' : 'CONVERT_FAILED', `qemu-img convert failed for ${src} ${dst}`, r, failureText(r));
  }

  /** Add a persistent bitmap; false when one of that name already exists. */
  async addBitmap(file: string, name: string): Promise<boolean> {
    const r = await this.run(['bitmap', '--add', file, name]);
    if (succeeded(r)) return true;
    if (/already exists/i.test(r.stderr)) return false;
    throw this.bitmapFailure(r);
  }

  /** Remove and add again in one open of the image: an empty, recording bitmap. */
  async replaceBitmap(file: string, name: string): Promise<void> {
    const r = await this.run(['bitmap', '--remove', '--add', file, name]);
    if (!succeeded(r)) throw this.bitmapFailure(r);
  }

  /** Remove a persistent bitmap (the parent bitmap an offline incremental has consumed). */
  async removeBitmap(file: string, name: string): Promise<void> {
    const r = await this.run(['bitmap', '--remove', file, name]);
    if (!succeeded(r)) throw this.bitmapFailure(r);
  }

  private bitmapFailure(r: RunResult): ToolError {
    return new ToolError('QEMU_IMG_FAILED', 'qemu-img bitmap failed', r, failureText(r));
  }

  /** The image's own persistent bitmaps (`qemu-img info --output=json`, no chain walk). */
  async bitmaps(file: string): Promise<ImageBitmap[]> {
    const r = await this.run(['info', '--output=json', file]);
    if (!succeeded(r)) throw new ToolError('QEMU_IMG_FAILED', `qemu-img info failed for ${file}`, r, failureText(r));
    try {
      return parseImageBitmaps(r.stdout);
    } catch (e) {
      throw new ToolError('QEMU_IMG_FAILED', `Cannot read the bitmaps of ${file}`, r, (e as Error).message);
    }
  }

  /** `shared`: -U, read-only check of an image another process may hold. */
  async check(file: string, opts: { shared?: boolean } = {}): Promise<CheckResult> {
    const r = await this.run(['check', ...(opts.shared ? ['-U'] : []), '--output=json', file]);
    if (r.exitCode === 0) return { kind: 'clean' };
    if (r.exitCode === 3) return { kind: 'leaks' };
    return { kind: 'failed', exitCode: r.exitCode, message: (r.stderr || r.stdout).trim().split('\n')[0] ?? '' };
  }
}
