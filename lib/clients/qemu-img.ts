// qemu-img behind a small typed client. Every call has a deadline; callers turn
// failures into their own messages and keep qemu-img's stderr as details.
import type { Runner, RunResult } from '../exec.js';

export interface RebaseArgs {
  file: string;
  backing: string;
  backingFormat: string;
  unsafe?: boolean;
}

export function rebaseArgs(a: RebaseArgs): string[] {
  return ['rebase', ...(a.unsafe ? ['-u'] : []), '-b', a.backing, '-F', a.backingFormat, a.file];
}

/** A persistent bitmap as `qemu-img info` lists it: `auto` = recording, `in-use` = left inconsistent by a crash. */
export interface ImageBitmap {
  name: string;
  flags: string[];
}

/** The bitmaps of a qcow2 image from `qemu-img info --output=json`. */
export function parseImageBitmaps(text: string): ImageBitmap[] {
  const info = JSON.parse(text) as { 'format-specific'?: { data?: { bitmaps?: unknown } } };
  const list = info['format-specific']?.data?.bitmaps ?? [];
  if (!Array.isArray(list)) throw new Error('qemu-img info: bitmaps is not a list');
  return list.map((b: { name?: unknown; flags?: unknown }) => ({
    name: String(b.name),
    flags: Array.isArray(b.flags) ? b.flags.map(String) : [],
  }));
}

export type BitmapAction = '--add' | '--clear' | '--remove' | '--enable' | '--disable';

export class QemuImgClient {
  constructor(
    private readonly runner: Runner,
    private readonly binary: string,
    private readonly timeoutMs: number,
  ) {}

  rebase(a: RebaseArgs): Promise<RunResult> {
    return this.runner.run(this.binary, rebaseArgs(a), { timeoutMs: this.timeoutMs });
  }

  /** Copy a disk into a new qcow2 (the source format is given, never probed). */
  convert(src: string, srcFormat: string, dst: string): Promise<RunResult> {
    return this.runner.run(this.binary, ['convert', '-f', srcFormat, '-O', 'qcow2', src, dst], { timeoutMs: this.timeoutMs });
  }

  /** Several actions run in the given order on one open of the image (e.g. --remove --add). */
  bitmap(file: string, action: BitmapAction | BitmapAction[], name: string): Promise<RunResult> {
    const actions = Array.isArray(action) ? action : [action];
    return this.runner.run(this.binary, ['bitmap', ...actions, file, name], { timeoutMs: this.timeoutMs });
  }

  /** `qemu-img info --output=json` of one image (no backing chain walk needed for its own bitmaps). */
  info(file: string): Promise<RunResult> {
    return this.runner.run(this.binary, ['info', '--output=json', file], { timeoutMs: this.timeoutMs });
  }

  /** `shared`: -U, read-only check of an image another process may hold. */
  check(file: string, opts: { shared?: boolean } = {}): Promise<RunResult> {
    return this.runner.run(this.binary, ['check', ...(opts.shared ? ['-U'] : []), '--output=json', file], { timeoutMs: this.timeoutMs });
  }
}
