// `--json` for the agent-style CLI (`-o …`): one JSON object per run, for people and
// automation. The agent never passes --json, so its byte formats stay exactly as they are:
// the operation writes its usual agent text into a buffer, and this module reads that
// text back (the formats of lib/agent-output.ts) into fields.
//   success: {"ok":true,"operation":"stats","mountPoint":…,"totalKiB":…,"usedKiB":…}
//   failure: {"ok":false,"errors":[{"code":…,"message":…,"details":…,"exitCode":…}]} (lifecycle.ts)
import { agentProfileFromEnv } from '../agent-output.js';
import type { NasbackupError } from '../errors.js';
import type { Output } from '../ops/context.js';
import type { CliArgs, Operation } from './args.js';

export function jsonFailure(errors: NasbackupError[]): string {
  return `${JSON.stringify({ ok: false, errors: errors.map((e) => e.toJSON()) })}\n`;
}

/** `-o stats`: mount point, then "<total> <used>". */
export function parseStatsText(text: string): { mountPoint: string; totalKiB: number; usedKiB: number } | null {
  const m = /^(.*)\n(\d+) (\d+)\n$/.exec(text);
  return m ? { mountPoint: m[1]!, totalKiB: Number(m[2]), usedKiB: Number(m[3]) } : null;
}

/** `-o delete`: the `rm -v` lines. */
export function parseDeleteText(text: string): { removedFiles: string[]; removedDirectories: string[] } {
  const removedFiles: string[] = [];
  const removedDirectories: string[] = [];
  for (const line of text.split('\n')) {
    const m = /^removed (directory )?'(.*)'$/.exec(line);
    if (m) (m[1] ? removedDirectories : removedFiles).push(m[2]!);
  }
  return { removedFiles, removedDirectories };
}

export interface BackupJson {
  /** Which stdout format the run used: `running` (-d "") or `stopped` (-d given), as the agent's parser decides. */
  format: 'running' | 'stopped';
  /** null: as asked; a reason (rebase-era profile) or true (later profiles): a full was taken instead of an incremental. */
  incrementalFallback: string | true | null;
  bitmapCreated: string | null;
  warnings: string[];
  /** Running format: domjobinfo of the completed job. */
  job?: Record<string, string>;
  /** Bytes on the NAS (running format; stopped format with the newest profile). */
  totalBytes?: number;
  /** Stopped format: one size per backup file. */
  fileSizes?: number[];
}

/** The backup text (lib/agent-output.ts runningBackupText / stoppedBackupText), any profile. */
export function parseBackupText(text: string, format: 'running' | 'stopped'): BackupJson {
  const r: BackupJson = { format, incrementalFallback: null, bitmapCreated: null, warnings: [] };
  const job: Record<string, string> = {};
  const numbers: number[] = [];
  let sizeTotal: number | undefined;
  let inJob = false;
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const marker = /^(INCREMENTAL_FALLBACK|BITMAP_CREATED|BACKUP_SIZE_TOTAL)=(.*)$/.exec(line);
    if (marker) {
      const [, key, value] = marker as unknown as [string, string, string];
      if (key === 'BITMAP_CREATED') r.bitmapCreated = value;
      else if (key === 'BACKUP_SIZE_TOTAL') sizeTotal = Number(value);
      else r.incrementalFallback = value === 'true' ? true : (/^full \((.*)\)$/.exec(value)?.[1] ?? value);
    } else if (/^\d+$/.test(line)) {
      numbers.push(Number(line));
    } else if (format === 'running' && (inJob || line.startsWith('Job type:'))) {
      inJob = true;
      const i = line.indexOf(':');
      if (i > 0) job[line.slice(0, i).trim()] = line.slice(i + 1).trim().replace(/\s+/g, ' ');
    } else {
      r.warnings.push(line);
    }
  }
  if (format === 'running') {
    r.job = job;
    const total = numbers.at(-1) ?? sizeTotal;
    if (total !== undefined) r.totalBytes = total;
  } else {
    r.fileSizes = numbers;
    if (sizeTotal !== undefined) r.totalBytes = sizeTotal;
  }
  return r;
}

/** What the operation would have printed for the agent, and the success object built from it. */
export function jsonReport(op: Operation, a: CliArgs, env: NodeJS.ProcessEnv): { out: Output; render(): string } {
  let text = '';
  const fields = (): Record<string, unknown> => {
    switch (op) {
      case 'stats':
        return parseStatsText(text) ?? { output: text };
      case 'delete': {
        const d = parseDeleteText(text);
        return { path: a.path, ...d, alreadyGone: d.removedFiles.length + d.removedDirectories.length === 0 };
      }
      case 'rebase':
        return { target: a.rebaseTarget, newBacking: a.rebaseNewBacking };
      case 'backup':
        return {
          vm: a.vm,
          path: a.path,
          ...(a.mode ? { mode: a.mode } : {}),
          profile: agentProfileFromEnv(env),
          ...parseBackupText(text, a.diskpaths ? 'stopped' : 'running'),
        };
    }
  };
  return {
    out: { write: (t) => void (text += t) },
    render: () => `${JSON.stringify({ ok: true, operation: op, ...fields() })}\n`,
  };
}
