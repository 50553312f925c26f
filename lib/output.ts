// The one place results become bytes. Operations return result objects (or throw a
// NasbackupError, possibly carrying what they had done); this module renders them:
//   agent  the script's stdout for the CloudStack agent (lib/agent-output.ts formats, unchanged)
//   text   operator text (chain tools, install-agent-hook, --version)
//   json   one envelope per run, for every command and every failure:
//          {"ok":…,"command":…, <the result's fields>, "errors":[{code,message,…}], "warnings":[{code,message}]}
// Operator output names files relative to the NAS (`<instance>/<timestamp>/<file> on <address>`),
// never the temporary mount point, which is gone by the time anyone reads it.
import { removedDirectoryLine, removedFileLine, runningBackupText, statsText, stoppedBackupText } from './agent-output.js';
import { exitCodeOf, type NasbackupError, type Warning } from './errors.js';
import type { ChainRepairPlan } from './ops/chain/provider-plan.js';
import type { DeletePlan } from './ops/chain/plan.js';
import type { ChainDeleteResult, ChainListResult, ChainPlanResult, ChainVerifyResult } from './ops/chain/index.js';
import type { RestoreResult } from './ops/restore.js';
import type { BackupResult, DeleteResult, RebaseResult, RemovedEntry, StatsResult } from './ops/results.js';
import type { MountResult, UmountResult } from './ops/mount.js';

export type { BackupResult, DeleteResult, RebaseResult, RemovedEntry, StatsResult };

export type OutputMode = 'agent' | 'text' | 'json';

/** Where the bytes go (stdout, or a buffer for the in-process agent runs and tests). */
export interface Output {
  write(text: string): void;
}

/** A NAS the run mounted: its temporary mount point and what it is on the network. */
export interface MountedNas {
  mountPoint: string;
  address: string;
}

/** How a run ended: the operation's result (if it got that far) and every failure, operation's first. */
export interface Outcome<T> {
  result?: T;
  errors: NasbackupError[];
  mounts: MountedNas[];
}

/** How one command's result is shown. `fields` are its JSON fields (beside ok/command/errors/warnings). */
export interface Renderer<T> {
  command: string;
  /** Agent bytes (agent mode) or operator text (text mode). */
  text?: (r: T, nas: NasNames) => string;
  fields: (r: T, nas: NasNames) => Record<string, unknown>;
  warnings?: (r: T) => Warning[];
  /** Text mode: the result's text already says why it failed (a plan with its reason), so no error lines. */
  textCarriesErrors?: boolean;
}

/** Turns absolute paths below a mount point into NAS-relative names for operators. */
export class NasNames {
  constructor(private readonly mounts: readonly MountedNas[]) {}

  /** `<mount>/a/b` → `a/b` (the path as the NAS knows it); anything else unchanged. */
  rel(abs: string): string {
    for (const m of this.mounts) {
      if (abs === m.mountPoint) return '.';
      if (abs.startsWith(`${m.mountPoint}/`)) return abs.slice(m.mountPoint.length + 1);
    }
    return abs;
  }

  /** Every `<mount>/a/b` inside a message → `a/b on <address>`. */
  text(message: string): string {
    let s = message;
    for (const m of this.mounts) {
      const mp = m.mountPoint.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      s = s.replace(new RegExp(`${mp}/([^\\s,;()'"]+)`, 'g'), (_all, rel: string) => {
        const tail = /[:.]+$/.exec(rel)?.[0] ?? ''; // sentence punctuation is not part of the name
        return `${rel.slice(0, rel.length - tail.length)} on ${m.address}${tail}`;
      });
    }
    return s;
  }
}

/** A mount point left behind is named as it is: it still exists, and the operator must remove it. */
const keepsMountPoint = (e: NasbackupError): boolean => e.code === 'NAS_CLEANUP_FAILED';

function errorJson(e: NasbackupError, nas: NasNames | null): Record<string, unknown> {
  const j = e.toJSON();
  return nas && !keepsMountPoint(e) ? { ...j, message: nas.text(j.message), ...(j.details ? { details: nas.text(j.details) } : {}) } : j;
}

/** The one JSON envelope. */
export function envelope(
  command: string,
  fields: Record<string, unknown>,
  errors: readonly NasbackupError[],
  warnings: readonly Warning[],
  nas: NasNames | null = null,
): string {
  return `${JSON.stringify({ ok: errors.length === 0, command, ...fields, errors: errors.map((e) => errorJson(e, nas)), warnings })}\n`;
}

/** Write how the run ended and return its exit code (one precedence rule: exitCodeOf). */
export function render<T>(out: Output, mode: OutputMode, r: Renderer<T>, outcome: Outcome<T>): number {
  const nas = new NasNames(outcome.mounts);
  // A failed operation may carry what it had found or done (a verify report, removed files).
  const result = (outcome.result ?? outcome.errors.find((e) => e.result !== undefined)?.result) as T | undefined;
  if (mode === 'json') {
    const fields = result === undefined ? {} : r.fields(result, nas);
    const warnings = result === undefined || !r.warnings ? [] : r.warnings(result).map((w) => ({ ...w, message: nas.text(w.message) }));
    out.write(envelope(r.command, fields, outcome.errors, warnings, nas));
    return exitCodeOf(outcome.errors);
  }
  if (result !== undefined && r.text) out.write(r.text(result, nas));
  if (result !== undefined && r.textCarriesErrors) return exitCodeOf(outcome.errors);
  for (const e of outcome.errors) {
    // Agent bytes stay as the contract says; operators get NAS-relative names.
    out.write(mode === 'agent' || keepsMountPoint(e) ? e.toText() : nas.text(e.toText()));
  }
  return exitCodeOf(outcome.errors);
}

/** A failure before anything ran (bad argv, bad settings). */
export function renderFailure(out: Output, mode: OutputMode, command: string, errors: NasbackupError[]): number {
  return render(out, mode, { command, fields: () => ({}) }, { errors, mounts: [] });
}

// --- the agent's operations ------------------------------------------------------------

export const statsRenderer: Renderer<StatsResult> = {
  command: 'stats',
  text: (r) => statsText(r.mountPoint, r.totalKiB, r.usedKiB),
  fields: (r) => ({ storage: r.address, totalKiB: Number(r.totalKiB), usedKiB: Number(r.usedKiB) }),
};

const removedLines = (removed: readonly RemovedEntry[]): string =>
  removed.map((e) => (e.directory ? removedDirectoryLine(e.path) : removedFileLine(e.path))).join('');

export const deleteRenderer: Renderer<DeleteResult> = {
  command: 'delete',
  text: (r) => removedLines(r.removed),
  fields: (r, nas) => ({
    path: r.path,
    removedFiles: r.removed.filter((e) => !e.directory).map((e) => nas.rel(e.path)),
    removedDirectories: r.removed.filter((e) => e.directory).map((e) => nas.rel(e.path)),
    alreadyGone: r.removed.length === 0,
  }),
};

export const rebaseRenderer: Renderer<RebaseResult> = {
  command: 'rebase',
  text: () => '', // the original printed nothing on success
  fields: (r) => ({ target: r.target, newBacking: r.newBacking, changed: r.changed }),
};

export function backupAgentText(r: BackupResult): string {
  return r.format === 'stopped' ? stoppedBackupText(r.report, r.files) : runningBackupText(r.report, r.jobBlock);
}

function jobFields(block: string): Record<string, string> {
  const job: Record<string, string> = {};
  for (const line of block.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0)
      job[line.slice(0, i).trim()] = line
        .slice(i + 1)
        .trim()
        .replace(/\s+/g, ' ');
  }
  return job;
}

export const backupRenderer: Renderer<BackupResult> = {
  command: 'backup',
  text: backupAgentText,
  fields: (r) => ({
    vm: r.vm,
    path: r.path,
    mode: r.mode,
    profile: r.report.profile,
    format: r.format,
    /** null: as asked; else why a full was taken instead of an incremental. */
    incrementalFallback: r.report.fallbackReason,
    bitmapCreated: r.report.bitmapCreated,
    totalBytes: Number(r.report.totalBytes),
    ...(r.format === 'running'
      ? { job: jobFields(r.jobBlock) }
      : { fileSizes: [...r.files].sort((a, b) => Buffer.compare(Buffer.from(a.name), Buffer.from(b.name))).map((f) => Number(f.size)) }),
  }),
  warnings: (r) => r.warnings,
};

// --- operator commands -------------------------------------------------------------------

export const chainListRenderer: Renderer<ChainListResult> = {
  command: 'chain list',
  text: ({ vm, backups }) => {
    let out = `${vm}: ${backups.backups.length} backup(s)\n`;
    for (const f of backups.files) {
      const what = f.error ? `UNREADABLE (${f.error})` : f.backingName === null ? 'full' : `<- ${f.backingName}`;
      out += `  ${f.backup}  ${f.name}  ${what}\n`;
    }
    for (const p of backups.partials) out += `  ${p}  (unfinished backup of an interrupted run)\n`;
    return out;
  },
  fields: ({ vm, backups }) => ({
    vm,
    backups: backups.backups,
    partials: backups.partials,
    files: backups.files.map((f) => ({
      backup: f.backup,
      file: f.name,
      volId: f.volId,
      kind: f.kind,
      virtualSize: f.virtualSize === null ? null : Number(f.virtualSize),
      backing: f.backingName,
      error: f.error,
    })),
  }),
};

export const chainVerifyRenderer: Renderer<ChainVerifyResult> = {
  command: 'chain verify',
  text: ({ vm, report }) => {
    let out = '';
    // One line per problem, each naming backup and disk (and extent, for content).
    for (const f of report.files) {
      if (f.errors.length === 0) out += `OK   ${vm}/${f.file}\n`;
      for (const e of f.errors) out += `FAIL ${vm}/${f.file}: ${e}\n`;
      for (const w of f.warnings) out += `     warning: ${w.message}\n`;
    }
    for (const w of report.warnings) out += `warning: ${w.message}\n`;
    const bad = report.files.filter((f) => f.errors.length > 0).length;
    return `${out}${vm}: ${report.files.length} file(s), ${bad} with errors\n`;
  },
  // Each file's errors stay with it; every warning, with its code, is also in the envelope's list.
  fields: ({ vm, report }) => ({ vm, files: report.files }),
  warnings: ({ vm, report }) => [
    ...report.files.flatMap((f) => f.warnings.map((w) => ({ ...w, file: `${vm}/${f.file}` }))),
    ...report.warnings,
  ],
};

/** A chain delete plan for people: what will be rebased, then what will be removed. */
export function planText(plan: DeletePlan): string {
  if (!plan.proceed) return ''; // the refusal is the error message
  let out = '';
  for (const r of plan.rebases) out += `rebase ${r.target} onto ${r.newBacking}\n`;
  for (const d of plan.remove) out += `remove ${d}\n`;
  if (plan.rebases.length === 0 && plan.remove.length === 0) out += `${plan.backup} is already gone\n`;
  return out;
}

export const chainPlanRenderer: Renderer<ChainPlanResult> = {
  command: 'chain plan-delete',
  text: ({ plan }) => planText(plan),
  fields: ({ plan }) => ({ plan }),
};

export const chainDeleteRenderer: Renderer<ChainDeleteResult> = {
  command: 'chain delete',
  text: ({ plan, done }) =>
    done.length === 0 && plan.proceed && plan.rebases.length === 0 && plan.remove.length === 0
      ? planText(plan)
      : done.map((d) => `${d}\n`).join(''),
  fields: ({ plan, done }) => ({ plan, done }),
};

// --- file-level access ------------------------------------------------------------------

const mib = (n: number): string => `${(n / 1048576).toFixed(n % 1048576 === 0 ? 0 : 1)} MiB`;

export const mountRenderer: Renderer<MountResult> = {
  command: 'mount',
  text: (r) =>
    `Backup disk ${r.disk} is mounted read-only under ${r.dir}:\n` +
    r.partitions
      .map((p) => {
        const what = p.number === 0 ? 'whole disk' : `partition ${p.number}`;
        return p.mountPoint
          ? `  ${p.mountPoint}  (${what}, ${mib(p.size)})\n`
          : `  ${what} (${mib(p.size)}) not mounted: ${p.reason ?? ''}\n`;
      })
      .join('') +
    `Undo with: nasbackup umount ${r.dir}\n`,
  fields: (r) => ({ dir: r.dir, backup: r.backup, disk: r.disk, partitions: r.partitions }),
  warnings: (r) => r.warnings,
};

export const umountRenderer: Renderer<UmountResult> = {
  command: 'umount',
  text: (r) => `Unmounted backup ${r.backup} from ${r.dir}\n`,
  fields: (r) => ({ dir: r.dir, backup: r.backup, undone: r.undone }),
};

/** Top-level `plan-delete`: the management server's own plan, as JSON even without --json (its historical output). */
export const providerPlanRenderer: Renderer<ChainRepairPlan> = {
  command: 'plan-delete',
  text: (plan) => `${JSON.stringify(plan, null, 2)}\n`,
  textCarriesErrors: true,
  fields: (plan) => ({ plan }),
};

export const restoreRenderer: Renderer<RestoreResult> = {
  command: 'restore',
  text: (r, nas) =>
    `restored ${nas.rel(r.file)} (${r.layers} layer(s)) to ${r.to} as ${r.format}${r.blockDevice ? ' (block device)' : ''}${r.synced ? '' : ' (not synced)'}: ` +
    `${r.virtualSize} bytes, ${r.dataBytes} of data\n` +
    r.warnings.map((w) => `warning: ${nas.text(w.message)}\n`).join(''),
  fields: (r, nas) => ({
    vm: r.vm,
    backup: `${r.vm}/${r.backup}`,
    disk: r.disk,
    file: nas.rel(r.file),
    layers: r.layers,
    to: r.to,
    format: r.format,
    blockDevice: r.blockDevice,
    replaced: r.replaced,
    synced: r.synced,
    virtualSize: r.virtualSize,
    dataBytes: r.dataBytes,
  }),
  warnings: (r) => r.warnings,
};

export const versionRenderer: Renderer<{ version: string }> = {
  command: 'version',
  text: (r) => `nasbackup ${r.version}\n`,
  fields: (r) => ({ name: 'nasbackup', version: r.version }),
};
