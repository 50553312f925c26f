// `--help` of each operator command: its own usage (exit 0). The agent CLI's -h keeps the
// original's full usage and exit 1 (lib/agent-output.ts usageText).

const CHAIN_NAS = '-t <type> -s <address> [-m <mount options>] --vm <instance>';

const CHAIN: Record<string, string> = {
  list: `nasbackup chain list ${CHAIN_NAS} [--json]
  Lists the backups of the VM on the NAS, each file with its backing file (read from the qcow2 headers).`,
  verify: `nasbackup chain verify ${CHAIN_NAS} [--backup <instance>/<timestamp>] [--json]
  Checks every chain of the VM (or, with --backup, that point in time and its chain): backing files
  present, relative, inside the VM folder, no cycles, same virtual size, refcounts and tables sound
  (a native check that counts like qemu-img check); and the
  content of every layer against its backup's manifest.json (each extent's digest), when it has one.
  Exit 1 (CHAIN_INVALID) and one line per problem when anything is wrong.`,
  'plan-delete': `nasbackup chain plan-delete ${CHAIN_NAS} --backup <instance>/<timestamp> [--force] [--records <records.json>] [--json]
  Shows what 'chain delete' would do (rebases, then removals), changing nothing.`,
  delete: `nasbackup chain delete ${CHAIN_NAS} --backup <instance>/<timestamp> [--force [--yes]] [--records <records.json>]
            [--engine <auto|native|qemu-img>] [--json]
  Removes the backup and repairs every disk of the backups that depend on it. --force also removes a
  full backup with its whole chain: on a terminal the plan is shown and confirmed first, unless --yes.`,
};

const COMMANDS: Record<string, string> = {
  'plan-delete': `nasbackup plan-delete --records <records.json> --backup <uuid> --root-volume-uuid <uuid> [--forced] [--json]
  The management server's own delete plan for these backup records (JSON), for checking.`,
  restore: `nasbackup restore -t <type> -s <address> [-m <mount options>] --backup <instance>/<timestamp> --disk <volume uuid>
            --to <path> [--format qcow2|raw] [--force] [--no-sync] [--json]
  Writes the disk of that backup (any point of a chain, flattened) to a new file or a block device, with only
  the NAS reachable. Raw targets are sparse; the format defaults to qcow2 for a .qcow2 target, raw otherwise.
  An existing target is refused unless --force (a block device is written in place, as raw only).
  The target is flushed to its device before the restore reports success; --no-sync leaves that to the
  kernel (faster on slow disks; a crash soon after may lose data the kernel had not written yet).`,
  mount: `nasbackup mount -t <type> -s <address> [-m <mount options>] --backup <instance>/<timestamp> [--disk <volume uuid>] [--json] <dir>
  Exposes one disk of a backup (the root disk by default) read-only under <dir> (an empty or new folder), each
  partition at <dir>/part<N> (a filesystem on the whole disk at <dir>/disk), so single files can be copied out.
  The NAS stays mounted until 'nasbackup umount <dir>'. Needs qemu-nbd (qemu-utils), nbdfuse (libnbd-bin), sfdisk (fdisk).`,
  umount: `nasbackup umount [--json] <dir>
  Undoes 'nasbackup mount' in reverse order: partition mounts, loop devices, nbdfuse, qemu-nbd, the NAS mount.
  Refuses a folder it did not set up; after a partial failure it can be run again.`,
  agent: `nasbackup agent [--profile rebase-era|merged|newest] < command.json
  Serves one CloudStack agent request from stdin, answering as that agent generation's wrapper would.`,
  'install-agent-hook': `nasbackup install-agent-hook [--target <script path>] [--node <absolute node path>] [--uninstall] [--json]
  Puts a launcher for this program at the agent's nasbackup.sh (the original is kept as .orig);
  --uninstall puts the original back.`,
};

/** The help of `nasbackup <command> [<subcommand>] --help`. */
export function operatorHelp(command: string, rest: readonly string[]): string {
  if (command === 'chain') {
    const sub = rest.find((a) => a in CHAIN);
    if (sub) return `Usage: ${CHAIN[sub]}\n`;
    return `Usage:\n${Object.values(CHAIN)
      .map((t) => `  ${t.split('\n')[0]}`)
      .join('\n')}\n(nasbackup chain <subcommand> --help for one of them)\n`;
  }
  return `Usage: ${COMMANDS[command] ?? command}\n`;
}
