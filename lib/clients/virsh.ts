// virsh behind a small typed client: one method per call the program makes, returning
// parsed values or throwing a coded ToolError. The parsers for virsh's table and
// key/value output (libvirt 9 formats, docs/e2e-lab.md §7) stay private to it.
import { describeFailure, failureText, succeeded, type Runner, type RunResult } from '../exec.js';
import { ToolError, toolFailure } from './failure.js';

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
function parseList(text: string): DomainRow[] {
  return tableRows(text, 3).map(([id, name, state]) => ({ id: id!, name: name!, state: state! }));
}

export interface BlockDevice {
  type: string;
  device: string;
  target: string;
  source: string;
}

/** `virsh domblklist DOM --details`: Type Device Target Source; Source may contain spaces. */
function parseDomblklistDetails(text: string): BlockDevice[] {
  return tableRows(text, 4).map(([type, device, target, source]) => ({ type: type!, device: device!, target: target!, source: source! }));
}

/** `virsh domjobinfo`: `Key:   value` lines; values keep their inner spacing, trimmed. */
function parseJobInfo(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) m.set(line.slice(0, i).trim(), line.slice(i + 1).trim());
  }
  return m;
}

const UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4, PiB: 1024 ** 5 };

/** "16.000 MiB" → bytes (for the progress bar only; never for agent-facing numbers). */
function parseSize(v: string | undefined): number | null {
  const m = v ? /^([\d.]+)\s*([KMGTP]iB|B)$/.exec(v) : null;
  return m ? Math.round(Number(m[1]) * UNITS[m[2]!]!) : null;
}

export interface QueryBlockBitmap {
  name: string;
  /** Bytes marked dirty (what an incremental from it copies). */
  count?: number;
  recording?: boolean;
  persistent?: boolean;
  busy?: boolean;
  inconsistent?: boolean;
}

export interface QueryBlockEntry {
  /** Image file of the top node (what domblklist shows as Source). */
  file: string | null;
  bitmaps: QueryBlockBitmap[];
  /** The disk's virtual size and the host bytes of each image of its chain (top first), when QEMU says. */
  image?: { virtualSize: number; actualSizes: number[] };
}

/** `inserted.image` of query-block: virtual size, and actual-size down the backing-image chain. */
function chainSizes(image: unknown): QueryBlockEntry['image'] | undefined {
  const top = image as Record<string, unknown> | undefined;
  if (!top || typeof top['virtual-size'] !== 'number') return undefined;
  const actualSizes: number[] = [];
  for (let i: Record<string, unknown> | undefined = top; i && actualSizes.length < 1000; i = i['backing-image'] as typeof i) {
    if (typeof i['actual-size'] === 'number') actualSizes.push(i['actual-size']);
  }
  return { virtualSize: top['virtual-size'], actualSizes };
}

/** QMP query-block reply (through qemu-monitor-command): the bitmaps on each disk's top image. */
function parseQueryBlock(text: string): QueryBlockEntry[] {
  const reply = JSON.parse(text) as { return?: unknown };
  if (!Array.isArray(reply.return)) throw new Error('query-block reply has no return array');
  return reply.return.map((e: Record<string, unknown>) => {
    const inserted = (e.inserted ?? {}) as Record<string, unknown>;
    const bitmaps = [
      ...((e['dirty-bitmaps'] as QueryBlockBitmap[] | undefined) ?? []),
      ...((inserted['dirty-bitmaps'] as QueryBlockBitmap[] | undefined) ?? []),
    ];
    const image = chainSizes(inserted.image);
    return { file: typeof inserted.file === 'string' ? inserted.file : null, bitmaps, ...(image ? { image } : {}) };
  });
}

/** One QEMU block job (QMP query-block-jobs): its id, kind, progress and rate limit (bytes/s, 0: none). */
export interface BlockJob {
  device: string;
  type: string;
  status: string | null;
  offset: number;
  len: number;
  speed: number;
}

function parseBlockJobs(text: string): BlockJob[] {
  const reply = JSON.parse(text) as { return?: unknown };
  if (!Array.isArray(reply.return)) throw new Error('query-block-jobs reply has no return array');
  return reply.return.map((j: Record<string, unknown>) => ({
    device: String(j.device),
    type: String(j.type),
    status: typeof j.status === 'string' ? j.status : null,
    offset: Number(j.offset ?? 0),
    len: Number(j.len ?? 0),
    speed: Number(j.speed ?? 0),
  }));
}

/** A domjobinfo answer: its fields, and the block itself (the agent reads it verbatim). */
export interface JobInfo {
  /** `Job type` (Completed, Failed, Cancelled, Unbounded, Bounded, None), or null. */
  type: string | null;
  fields: ReadonlyMap<string, string>;
  text: string;
  /** Bytes done and to do (the progress bar only), when the job says. */
  processed: number | null;
  total: number | null;
}

function jobInfo(text: string): JobInfo {
  const fields = parseJobInfo(text);
  return {
    type: fields.get('Job type') ?? null,
    fields,
    text,
    processed: parseSize(fields.get('File processed') ?? fields.get('Data processed')),
    total: parseSize(fields.get('File total') ?? fields.get('Data total')),
  };
}

/** What restore needs besides the disks, by the file name it is saved under. */
const RESTORE_FILES = {
  'domain-config.xml': 'dumpxml',
  'dominfo.xml': 'dominfo',
  'domiflist.xml': 'domiflist',
  'domblklist.xml': 'domblklist',
} as const;
export type RestoreFile = keyof typeof RESTORE_FILES;
export const RESTORE_FILE_NAMES = Object.keys(RESTORE_FILES) as RestoreFile[];

/** What `virsh version` says (each field only when found), and its text for error details. */
export interface VirshVersions {
  qemu?: string;
  libvirt?: string;
  api?: string;
  text: string;
}

const lastField = (line: string | undefined): string | undefined => line?.trim().split(/\s+/).at(-1);

/** Same extraction rules as the original: `hypervisor` line, LAST `libvirt` line, `API` line. */
function parseVirshVersion(text: string): VirshVersions {
  const lines = text.split('\n');
  const out: VirshVersions = { text };
  const qemu = lastField(lines.find((l) => l.includes('hypervisor')));
  const libvirt = lastField(lines.filter((l) => l.includes('libvirt')).at(-1));
  const api = lastField(lines.find((l) => l.includes('API')));
  if (qemu) out.qemu = qemu;
  if (libvirt) out.libvirt = libvirt;
  if (api) out.api = api;
  return out;
}

export class VirshClient {
  constructor(
    private readonly runner: Runner,
    private readonly binary: string,
    private readonly timeoutMs: number,
  ) {}

  private run(args: string[], opts: { abortable?: boolean; timeoutMs?: number } = {}): Promise<RunResult> {
    return this.runner.run(this.binary, ['-c', URI, ...args], {
      timeoutMs: opts.timeoutMs ?? this.timeoutMs,
      ...(opts.abortable === false ? { abortable: false } : {}),
    });
  }

  /** stdout of a call that must succeed; `what` names it in the error. */
  private async call(what: string, args: string[], opts: { abortable?: boolean; timeoutMs?: number } = {}): Promise<string> {
    const r = await this.run(args, opts);
    if (!succeeded(r)) throw toolFailure('VIRSH_FAILED', `virsh ${what}`, r);
    return r.stdout;
  }

  /** `virsh version`, without `-c`, as the original's sanity check runs it. */
  async version(): Promise<VirshVersions> {
    const r = await this.runner.run(this.binary, ['version'], { timeoutMs: this.timeoutMs });
    if (!succeeded(r)) {
      throw new ToolError(
        'LIBVIRT_UNAVAILABLE',
        `Cannot query the QEMU/libvirt versions (${describeFailure(r)}); is libvirtd running?`,
        r,
        r.stderr || r.stdout,
      );
    }
    return parseVirshVersion(r.stdout);
  }

  /** The active domains. */
  async list(): Promise<DomainRow[]> {
    const r = await this.run(['list']);
    if (!succeeded(r)) throw new ToolError('LIBVIRT_UNAVAILABLE', `Cannot list domains (${describeFailure(r)})`, r, r.stderr || r.stdout);
    return parseList(r.stdout);
  }

  /** Every block device of the domain (disks, cdroms), with its source. */
  async blockDevices(vm: string): Promise<BlockDevice[]> {
    return parseDomblklistDetails(await this.call(`domblklist ${vm}`, ['domblklist', vm, '--details']));
  }

  /** The raw text saved next to the backup for restore (domain-config.xml etc.). */
  restoreFile(vm: string, file: RestoreFile): Promise<string> {
    return this.call(file, [RESTORE_FILES[file], vm]);
  }

  /** `domstate` text, e.g. "running" or "paused". */
  async state(vm: string): Promise<string> {
    return (await this.call(`domstate ${vm}`, ['domstate', vm], { abortable: false })).trim();
  }

  /**
   * `domstate --reason`: the state and why, e.g. paused / "I/O error" (libvirt's words; an
   * older virsh or a stand-in that prints no reason gives an empty one).
   */
  async stateReason(vm: string): Promise<{ state: string; reason: string }> {
    const text = (await this.call(`domstate ${vm}`, ['domstate', vm, '--reason'], { abortable: false })).trim();
    const m = /^(.*?)\s*\(([^()]*)\)$/.exec(text);
    return m ? { state: m[1]!, reason: m[2]! } : { state: text, reason: '' };
  }

  async resume(vm: string): Promise<void> {
    await this.call(`resume ${vm}`, ['resume', vm], { abortable: false });
  }

  /** Names of the checkpoints libvirt has registered for the domain. */
  async checkpoints(vm: string): Promise<string[]> {
    const text = await this.call(`checkpoint-list ${vm}`, ['checkpoint-list', vm, '--name']);
    return text
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean);
  }

  async checkpointCreate(vm: string, xmlFile: string, redefine: boolean): Promise<void> {
    await this.call(`checkpoint-create ${vm}`, ['checkpoint-create', vm, '--xmlfile', xmlFile, ...(redefine ? ['--redefine'] : [])]);
  }

  /** Cleanup and housekeeping: never cancelled by a signal. */
  async checkpointDelete(vm: string, name: string): Promise<void> {
    await this.call(`checkpoint-delete ${vm} ${name}`, ['checkpoint-delete', vm, name], { abortable: false });
  }

  /** The bitmaps on each disk's top image (QMP query-block through the monitor). */
  async queryBlock(vm: string): Promise<QueryBlockEntry[]> {
    const text = await this.call(`qemu-monitor-command ${vm}`, ['qemu-monitor-command', vm, '{"execute":"query-block"}']);
    try {
      return parseQueryBlock(text);
    } catch (e) {
      throw new ToolError('VIRSH_FAILED', `Cannot read the query-block reply of ${vm}`, null, (e as Error).message);
    }
  }

  /** QEMU's block jobs of the domain (QMP query-block-jobs): a push backup runs one per disk. */
  async blockJobs(vm: string): Promise<BlockJob[]> {
    const text = await this.call(`qemu-monitor-command ${vm}`, ['qemu-monitor-command', vm, '{"execute":"query-block-jobs"}']);
    try {
      return parseBlockJobs(text);
    } catch (e) {
      throw new ToolError('VIRSH_FAILED', `Cannot read the query-block-jobs reply of ${vm}`, null, (e as Error).message);
    }
  }

  /**
   * Limit one block job's copy rate (QMP block-job-set-speed; bytes/s, 0 lifts it).
   * libvirt's `blockjob --bandwidth` reaches the same job, but only by disk; the job id
   * lets a limit shared by several disks be moved to the ones still copying.
   */
  async setBlockJobSpeed(vm: string, device: string, bytesPerSec: number): Promise<void> {
    const cmd = JSON.stringify({ execute: 'block-job-set-speed', arguments: { device, speed: Math.round(bytesPerSec) } });
    const out = await this.call(`qemu-monitor-command ${vm}`, ['qemu-monitor-command', vm, cmd]);
    let reply: { error?: { desc?: string } } = {};
    try {
      reply = JSON.parse(out.trim() || '{}') as typeof reply;
    } catch {
      // not JSON: virsh said nothing about an error
    }
    if (reply.error) throw new ToolError('VIRSH_FAILED', `block-job-set-speed ${device} on ${vm} failed`, null, reply.error.desc ?? out);
  }

  /**
   * `backup-begin`. With `limits`, each disk's job gets its rate limit (libvirt's
   * `blockjob --bandwidth`) in the same virsh session, right behind it: libvirt's backup
   * XML has no rate limit, and QEMU copies hundreds of MiB in the time a second virsh
   * takes to start. Returns the limits that could not be set (their error text).
   */
  async backupBegin(
    vm: string,
    backupXml: string,
    checkpointXml: string | null,
    limits: ReadonlyArray<{ target: string; bytesPerSec: number }> = [],
  ): Promise<string[]> {
    const begin = ['backup-begin', '--domain', vm, '--backupxml', backupXml, ...(checkpointXml ? ['--checkpointxml', checkpointXml] : [])];
    if (limits.length === 0) {
      const r = await this.run(begin);
      if (!succeeded(r)) throw new ToolError('BACKUP_BEGIN_FAILED', `Failed to start the backup of ${vm}`, r, failureText(r));
      return [];
    }
    // virsh batch mode: `cmd ; cmd`, every word single-quoted (virsh's quoting is the shell's).
    const quote = (w: string): string => `'${w.replace(/'/g, `'\\''`)}'`;
    const cmds = [
      begin,
      ...limits.map((l) => ['blockjob', vm, l.target, '--bandwidth', String(Math.max(1, Math.round(l.bytesPerSec))), '--bytes']),
    ];
    const r = await this.run([cmds.map((c) => c.map(quote).join(' ')).join(' ; ')]);
    // Each command runs whatever the one before did: backup-begin's own answer decides.
    if (!/^Backup started/m.test(r.stdout))
      throw new ToolError('BACKUP_BEGIN_FAILED', `Failed to start the backup of ${vm}`, r, failureText(r));
    return r.stderr
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l.startsWith('error:'));
  }

  /** Completed-job statistics; `keep` leaves them for a later read. */
  async jobInfoCompleted(vm: string, opts: { keep?: boolean; anystats?: boolean } = {}): Promise<JobInfo> {
    const args = ['domjobinfo', vm, '--completed', ...(opts.keep ? ['--keep-completed'] : []), ...(opts.anystats ? ['--anystats'] : [])];
    return jobInfo(await this.call(`domjobinfo ${vm}`, args, { abortable: false }));
  }

  /** The active job (Unbounded while a backup runs, None when there is none). */
  async jobInfo(vm: string): Promise<JobInfo> {
    return jobInfo(await this.call(`domjobinfo ${vm}`, ['domjobinfo', vm], { abortable: false }));
  }

  async jobAbort(vm: string): Promise<void> {
    await this.call(`domjobabort ${vm}`, ['domjobabort', vm], { abortable: false });
  }

  /** Freeze the guest's filesystems through its agent. */
  async guestFreeze(vm: string, timeoutSec: number): Promise<void> {
    await this.agentCommand(vm, '{"execute":"guest-fsfreeze-freeze"}', timeoutSec, true);
  }

  /** Thaw: part of every cleanup, so never cancelled by a signal. */
  async guestThaw(vm: string, timeoutSec: number): Promise<void> {
    await this.agentCommand(vm, '{"execute":"guest-fsfreeze-thaw"}', timeoutSec, false);
  }

  private agentCommand(vm: string, json: string, timeoutSec: number, abortable: boolean): Promise<string> {
    return this.call(`qemu-agent-command ${vm}`, ['qemu-agent-command', vm, '--timeout', String(timeoutSec), json], {
      timeoutMs: (timeoutSec + 10) * 1000,
      abortable,
    });
  }
}
