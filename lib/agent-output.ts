// Every byte format the CloudStack agent reads from our stdout, in one place.
// The agent reads stdout only (never stderr), line by line; see the contract §5.

/** Usage, printed for -h and after `Invalid option:`. The first lines match the original's synopsis. */
export function usageText(script: string): string {
  return [
    '',
    `Usage: ${script} -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false>`,
    '         [-M|--mode <full|incremental>] [--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>]',
    '',
    'Operations (-o):',
    '  backup   back up VM -v to <backup path> on the NAS (running VM: libvirt push backup; stopped VM: copy of -d disks)',
    '  delete   remove the backup directory -p (<instance>/<timestamp>) from the NAS',
    '  rebase   point --rebase-target at --rebase-new-backing (both relative to the NAS root), keeping its content',
    '  stats    print the mount point, then "<total> <used>" of the NAS in 1K blocks',
    '',
    'NAS: -t is the mount type, -s the source, -m the mount options ("" for none); cifs always gets nobrl.',
    'Backup modes (-M): full (needs --bitmap-new), incremental (needs --bitmap-parent, --bitmap-new and',
    '  --parent-paths, one parent qcow2 per disk, or --parent-path for one disk); without -M: full, no checkpoint.',
    'Rebase: --rebase-target <rel> --rebase-new-backing <rel> (no -p).',
    'Environment: NASBACKUP_LOG_FILE, NASBACKUP_MOUNT_TIMEOUT, NASBACKUP_QEMU_IMG_TIMEOUT, NASBACKUP_VERSION_CHECK (see README).',
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
 * Agent generations that may be paired with us (contract §1, §5.2). They differ in the
 * marker lines they strip and where they read the size from.
 *   rebase-era: G1/G2 wrapper — strips BITMAP_CREATED=/BITMAP_RECREATED=/INCREMENTAL_FALLBACK= lines.
 *   merged:     W2/G3 wrapper — detects INCREMENTAL_FALLBACK=true; BITMAP_CREATED= may not be stripped.
 *   newest:     W4 wrapper — reads BACKUP_SIZE_TOTAL=<bytes>.
 */
export const AGENT_PROFILES = ['rebase-era', 'merged', 'newest'] as const;
export type AgentProfile = (typeof AGENT_PROFILES)[number];

export function agentProfileFromEnv(env: NodeJS.ProcessEnv): AgentProfile {
  const p = env.NASBACKUP_AGENT_PROFILE;
  return (AGENT_PROFILES as readonly string[]).includes(p ?? '') ? (p as AgentProfile) : 'rebase-era';
}

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

/**
 * Stopped-VM format (`-d` non-empty): the wrapper parses EVERY remaining line as an
 * integer, so only markers it strips, then one size per backup file, no empty line.
 */
export function stoppedBackupText(r: BackupReport, fileSizes: bigint[]): string {
  let out = fallbackLine(r);
  if (r.profile === 'rebase-era' && r.bitmapCreated) out += `BITMAP_CREATED=${r.bitmapCreated}\n`;
  if (r.profile === 'newest') out += `BACKUP_SIZE_TOTAL=${r.totalBytes}\n`;
  return out + fileSizes.map((s) => `${s}\n`).join('');
}
