// Every byte format the CloudStack agent reads from our stdout, in one place.
// The agent reads stdout only (never stderr), line by line; see docs/agent-contract.md §5.
import type { AgentProfile } from '../compat/protocol.js';

/**
 * Usage, printed for -h/--help (exit 1, as the original) and after `Invalid option:`.
 * The first three lines are the original's (an empty line, then its 2-line synopsis);
 * the rest covers every operation, flag and operator command this program has.
 */
export function usageText(script: string): string {
  return [
    '',
    `Usage: ${script} -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false>`,
    '         [-M|--mode <full|incremental>] [--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>]',
    '',
    'Operations (-o|--operation):',
    '  backup   back up VM -v to <backup path> (-p <instance>/<timestamp>) on the NAS; running or paused VM:',
    '           libvirt push backup; stopped VM: qemu-img copy of the -d disks (comma-separated)',
    '  delete   remove the backup directory -p (<instance>/<timestamp>) from the NAS',
    '  rebase   --rebase-target <rel> --rebase-new-backing <rel> (both relative to the NAS root, no -p):',
    '           point the target at the new backing, keeping its content',
    '  stats    print the mount point, then "<total> <used>" of the NAS in 1K blocks',
    '',
    'Options:',
    '  -t|--type <type>  -s|--storage <address>  -m|--mount <options>   the NAS: mount -t <type> <address> [-o <options>]',
    '                    ("" for no options; cifs always gets nobrl)',
    '  -v|--vm <domain>  -p|--path <instance>/<timestamp>  -q|--quiesce <true|false>  -d|--diskpaths <disks>   backup',
    '  -M|--mode <full|incremental|legacy-full>   none or legacy-full: full backup, no checkpoint;',
    '           full needs --bitmap-new; incremental needs --bitmap-new, --bitmap-parent and --parent-paths',
    '  --bitmap-new <name>  --bitmap-parent <name>   checkpoint to create / to start the incremental from',
    '  --parent-paths <p1,p2,...>   the parent qcow2 of every disk, relative to the NAS root, matched by volume id',
    "  --parent-path <p>   older agents: the root disk's parent only (the data disks' parents come from its folder)",
    '  --quiesce-timeout <seconds>   guest-agent freeze/thaw timeout (NASBACKUP_QUIESCE_TIMEOUT)',
    '  -w|--mount-timeout <seconds>   mount deadline (NASBACKUP_MOUNT_TIMEOUT)',
    '  --engine <auto|native|qemu-img>   rebase engine (NASBACKUP_ENGINE, default auto; see the README)',
    '  --verify   accepted and logged (running-VM backups are always checked to read as a complete chain)',
    '  -b|--bandwidth <MiB/s>   backup: limit the copy rate (running VM: the QEMU backup jobs; stopped VM: the copy)',
    '  -c|--compress   stopped-VM backup: compressed qcow2 clusters (refused for a running VM: QEMU writes that file)',
    '  -e|--encrypt <key>   refused: not supported (nothing would record which key encrypted which backup)',
    '  --json     one JSON object per run on stdout ({"ok":…,"command":…,…,"errors":[…],"warnings":[…]}), for people',
    '             and automation; never used by the agent',
    "  -h|--help  this text (exit 1, as the original; after an operator command: that command's usage, exit 0)",
    '',
    'Operator commands (not used by the agent):',
    '  nasbackup --version [--json]',
    '  nasbackup chain list|verify|plan-delete|delete -t <type> -s <address> [-m <options>] --vm <instance>',
    '            [--backup <instance>/<timestamp>] [--force [--yes]] [--json] [--records <records.json>] [--engine <mode>]',
    '  nasbackup plan-delete --records <records.json> --backup <uuid> --root-volume-uuid <uuid> [--forced] [--json]',
    '  nasbackup restore -t <type> -s <address> [-m <options>] --backup <instance>/<timestamp> --disk <volume uuid>',
    '            --to <path> [--format qcow2|raw] [--force] [--json]',
    '  nasbackup agent [--profile rebase-era|merged|newest] < command.json',
    '  nasbackup install-agent-hook [--target <script path>] [--node <absolute node path>] [--uninstall] [--json]',
    '            default target /usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/nasbackup.sh (original kept as .orig)',
    '  nasbackup mount -t <type> -s <address> [-m <options>] --backup <instance>/<timestamp> [--disk <volume uuid>] [--json] <dir>',
    '  nasbackup umount [--json] <dir>   (file-level access: a backup disk read-only under <dir>, and back)',
    '',
    'Environment: NASBACKUP_LOG_FILE, NASBACKUP_MOUNT_TIMEOUT, NASBACKUP_UMOUNT_TIMEOUT, NASBACKUP_UMOUNT_ATTEMPTS,',
    '  NASBACKUP_UMOUNT_RETRY_DELAY, NASBACKUP_NAS_TIMEOUT, NASBACKUP_NAS_PROBE_INTERVAL, NASBACKUP_COMMAND_TIMEOUT,',
    '  NASBACKUP_QEMU_IMG_TIMEOUT, NASBACKUP_VERSION_CHECK,',
    '  NASBACKUP_JOB_TIMEOUT, NASBACKUP_JOB_POLL_INITIAL, NASBACKUP_JOB_POLL_MAX, NASBACKUP_QUIESCE_TIMEOUT,',
    '  NASBACKUP_JOB_MIN_RATE, NASBACKUP_JOB_BASE, NASBACKUP_AGENT_TIMEOUT, NASBACKUP_HEARTBEAT_INTERVAL,',
    '  NASBACKUP_SPACE_CHECK, NASBACKUP_SPACE_MARGIN, NASBACKUP_HASH_WORKERS, NASBACKUP_DIGEST,',
    '  NASBACKUP_QUIESCE_REQUIRED, NASBACKUP_AGENT_PROFILE, NASBACKUP_LOCK_WAIT, NASBACKUP_LOCK_STALE_AFTER,',
    '  NASBACKUP_BREAK_LOCK, NASBACKUP_VIRSH, NASBACKUP_QEMU_IMG, NASBACKUP_ENGINE, NASBACKUP_SCRIPT_NAME (see the README).',
    '  For measurements only: NASBACKUP_BENCH_SKIP_MANIFEST.',
    'Exit codes: 0 success, 20 a mount or mount point remains after cleanup, 1 any other failure.',
    '',
    '',
  ].join('\n');
}

export function invalidOptionText(arg: string, script: string): string {
  return `Invalid option: ${arg}\n${usageText(script)}`;
}

/** `-o stats`: the Java wrapper splits all of stdout on whitespace and takes tokens 0, 1, 2. */
export function statsText(mountPoint: string, totalKiB: bigint, usedKiB: bigint): string {
  return `${mountPoint}\n${totalKiB} ${usedKiB}\n`;
}

/** `-o delete`: lines like `rm -v` (the agent ignores them; operators read them in the log). */
export const removedFileLine = (path: string): string => `removed '${path}'\n`;
export const removedDirectoryLine = (path: string): string => `removed directory '${path}'\n`;

/**
 * Agent generations that may be paired with us (docs/agent-contract.md §1, §5.2). They differ in the
 * marker lines they strip and where they read the size from.
 *   rebase-era: G1/G2 wrapper — strips BITMAP_CREATED=/BITMAP_RECREATED=/INCREMENTAL_FALLBACK= lines.
 *   merged:     W2/G3 wrapper — detects INCREMENTAL_FALLBACK=true; BITMAP_CREATED= may not be stripped.
 *   newest:     W4 wrapper — reads BACKUP_SIZE_TOTAL=<bytes>.
 */
export { AGENT_PROFILES, type AgentProfile } from '../compat/protocol.js';

export const STOPPED_FALLBACK_REASON = 'VM stopped — incremental requires running VM';

export interface BackupReport {
  profile: AgentProfile;
  /** Set when an incremental was asked for and a full was taken instead. */
  fallbackReason: string | null;
  /** Reported to the rebase-era agent only (later ones take it from --bitmap-new). */
  bitmapCreated: string | null;
  /** Lines an operator should see (e.g. quiesce failed); running-VM format only. */
  warnings: string[];
  totalBytes: bigint;
}

function fallbackLine(r: BackupReport): string {
  if (r.fallbackReason === null) return '';
  return r.profile === 'rebase-era' ? `INCREMENTAL_FALLBACK=full (${r.fallbackReason})\n` : 'INCREMENTAL_FALLBACK=true\n';
}

/**
 * Running-VM format (`-d ""`): markers and warnings, the completed domjobinfo block,
 * then the byte total as the LAST line (every wrapper parses the last line).
 */
export function runningBackupText(r: BackupReport, jobBlock: string): string {
  let out = fallbackLine(r) + r.warnings.map((w) => `${w}\n`).join('');
  out += jobBlock.endsWith('\n') ? jobBlock : `${jobBlock}\n`;
  if (r.profile === 'newest') out += `BACKUP_SIZE_TOTAL=${r.totalBytes}\n`;
  out += `${r.totalBytes}\n`;
  // The rebase-era wrapper strips it before reading the last line (as the original printed it).
  if (r.profile === 'rebase-era' && r.bitmapCreated) out += `BITMAP_CREATED=${r.bitmapCreated}\n`;
  return out;
}

/** One file of a stopped-VM backup folder: its name there and its size in bytes. */
export interface BackupFileSize {
  name: string;
  size: bigint;
}

/**
 * Stopped-VM format (`-d` non-empty): the wrapper parses EVERY remaining line as an
 * integer, so only markers it strips, then one size per backup file, no empty line.
 * The sizes come in the original's order: it listed the backup folder with `ls` in the
 * C locale, i.e. by byte order of the names (`datadisk.*` before `root.*`). The sum is
 * the same either way, but the agent passes these lines on as the answer's details.
 */
export function stoppedBackupText(r: BackupReport, files: readonly BackupFileSize[]): string {
  let out = fallbackLine(r);
  if (r.profile === 'rebase-era' && r.bitmapCreated) out += `BITMAP_CREATED=${r.bitmapCreated}\n`;
  if (r.profile === 'newest') out += `BACKUP_SIZE_TOTAL=${r.totalBytes}\n`;
  const sorted = [...files].sort((a, b) => Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)));
  return out + sorted.map((f) => `${f.size}\n`).join('');
}
