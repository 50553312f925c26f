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
