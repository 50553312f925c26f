// virsh behind a small typed client: one method per call the program makes, and the
// parsers for virsh's table and key/value output (libvirt 9 formats, docs/e2e-lab.md §7).
import type { Runner, RunResult } from '../exec.js';

export const URI = 'qemu:///system';

export interface DomainRow {
  id: string;
  name: string;
  state: string;
}

/** Rows after the dash line of a virsh table, split into `columns` cells (the last one may hold spaces). */
function tableRows(text: string, columns: number): string[][] {
  const lines = text.split('\n');
  const dash = lines.findIndex((l) => /^-{3,}\s*$/.test(l));
  const row = new RegExp(`^\\s*${'(\\S+)\\s+'.repeat(columns - 1)}(\\S.*?)\\s*$`);
  const out: string[][] = [];
  for (const line of lines.slice(dash + 1)) {
    const m = row.exec(line);
    if (m) out.push(m.slice(1));
  }
  return out;
}

/** `virsh list`: ` Id   Name   State` header, a dash line, then one row per active domain. */
export function parseList(text: string): DomainRow[] {
  return tableRows(text, 3).map(([id, name, state]) => ({ id: id!, name: name!, state: state! }));
}

export interface BlockDevice {
  type: string;
  device: string;
  target: string;
  source: string;
}

/** `virsh domblklist DOM --details`: Type Device Target Source; Source may contain spaces. */
export function parseDomblklistDetails(text: string): BlockDevice[] {
  return tableRows(text, 4).map(([type, device, target, source]) => ({ type: type!, device: device!, target: target!, source: source! }));
}

/** `virsh domjobinfo`: `Key:   value` lines; values keep their inner spacing, trimmed. */
export function parseJobInfo(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) m.set(line.slice(0, i).trim(), line.slice(i + 1).trim());
  }
  return m;
}

const UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4, PiB: 1024 ** 5 };

/** "16.000 MiB" → bytes (for the progress bar only; never for agent-facing numbers). */
export function parseSize(v: string | undefined): number | null {
  const m = v ? /^([\d.]+)\s*([KMGTP]iB|B)$/.exec(v) : null;
  return m ? Math.round(Number(m[1]) * UNITS[m[2]!]!) : null;
}

export interface QueryBlockBitmap {
  name: string;
  recording?: boolean;
  persistent?: boolean;
  busy?: boolean;
  inconsistent?: boolean;
}

export interface QueryBlockEntry {
  /** Image file of the top node (what domblklist shows as Source). */
  file: string | null;
  bitmaps: QueryBlockBitmap[];
}

/** QMP query-block reply (through qemu-monitor-command): the bitmaps on each disk's top image. */
export function parseQueryBlock(text: string): QueryBlockEntry[] {
  const reply = JSON.parse(text) as { return?: unknown };
  if (!Array.isArray(reply.return)) throw new Error('query-block reply has no return array');
  return reply.return.map((e: Record<string, unknown>) => {
    const inserted = (e.inserted ?? {}) as Record<string, unknown>;
    const bitmaps = [
      ...((e['dirty-bitmaps'] as QueryBlockBitmap[] | undefined) ?? []),
      ...((inserted['dirty-bitmaps'] as QueryBlockBitmap[] | undefined) ?? []),
    ];
    return { file: typeof inserted.file === 'string' ? inserted.file : null, bitmaps };
  });
}

export class VirshClient {
  constructor(
    private readonly runner: Runner,
    private readonly binary: string,
    private readonly timeoutMs: number,
  ) {}

  private call(args: string[], opts: { abortable?: boolean; timeoutMs?: number } = {}): Promise<RunResult> {
    return this.runner.run(this.binary, ['-c', URI, ...args], {
      timeoutMs: opts.timeoutMs ?? this.timeoutMs,
      ...(opts.abortable === false ? { abortable: false } : {}),
    });
  }

  /** `virsh version`, without `-c`, as the original's sanity check runs it. */
  version(): Promise<RunResult> {
    return this.runner.run(this.binary, ['version'], { timeoutMs: this.timeoutMs });
  }

  list(): Promise<RunResult> {
    return this.call(['list']);
  }
  domblklistDetails(vm: string): Promise<RunResult> {
    return this.call(['domblklist', vm, '--details']);
  }
  /** Raw outputs saved next to the backup for restore (domain-config.xml etc.). */
  dumpxml(vm: string): Promise<RunResult> {
    return this.call(['dumpxml', vm]);
  }
  dominfo(vm: string): Promise<RunResult> {
    return this.call(['dominfo', vm]);
  }
  domiflist(vm: string): Promise<RunResult> {
    return this.call(['domiflist', vm]);
  }
  domblklist(vm: string): Promise<RunResult> {
    return this.call(['domblklist', vm]);
  }
  domstate(vm: string): Promise<RunResult> {
    return this.call(['domstate', vm], { abortable: false });
  }
  resume(vm: string): Promise<RunResult> {
    return this.call(['resume', vm], { abortable: false });
  }
  checkpointList(vm: string): Promise<RunResult> {
    return this.call(['checkpoint-list', vm, '--name']);
  }
  checkpointCreate(vm: string, xmlFile: string, redefine: boolean): Promise<RunResult> {
    return this.call(['checkpoint-create', vm, '--xmlfile', xmlFile, ...(redefine ? ['--redefine'] : [])]);
  }
  /** Cleanup and housekeeping: never cancelled by a signal. */
  checkpointDelete(vm: string, name: string): Promise<RunResult> {
    return this.call(['checkpoint-delete', vm, name], { abortable: false });
  }
  queryBlock(vm: string): Promise<RunResult> {
    return this.call(['qemu-monitor-command', vm, '{"execute":"query-block"}']);
  }
  backupBegin(vm: string, backupXml: string, checkpointXml: string | null): Promise<RunResult> {
    return this.call(['backup-begin', '--domain', vm, '--backupxml', backupXml, ...(checkpointXml ? ['--checkpointxml', checkpointXml] : [])]);
  }
  /** Completed-job statistics; `keep` leaves them for a later read. */
  jobInfoCompleted(vm: string, opts: { keep?: boolean; anystats?: boolean } = {}): Promise<RunResult> {
    return this.call(
      ['domjobinfo', vm, '--completed', ...(opts.keep ? ['--keep-completed'] : []), ...(opts.anystats ? ['--anystats'] : [])],
      { abortable: false },
    );
  }
  /** The active job (Unbounded while a backup runs, None when there is none). */
  jobInfo(vm: string): Promise<RunResult> {
    return this.call(['domjobinfo', vm], { abortable: false });
  }
  jobAbort(vm: string): Promise<RunResult> {
    return this.call(['domjobabort', vm], { abortable: false });
  }
  agentCommand(vm: string, json: string, timeoutSec: number, abortable = true): Promise<RunResult> {
    return this.call(['qemu-agent-command', vm, '--timeout', String(timeoutSec), json], {
      timeoutMs: (timeoutSec + 10) * 1000,
      abortable,
    });
  }
}
