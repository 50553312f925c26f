// What the agent's operations return: plain data that lib/output.ts renders as the agent's
// bytes, operator text or JSON. Here, beside the operations, so that they import nothing
// from the renderer above them.
import type { BackupFileSize, BackupReport } from '../agent-output.js';
import type { Warning } from '../errors.js';

export interface StatsResult {
  mountPoint: string;
  address: string;
  totalKiB: bigint;
  usedKiB: bigint;
}

export interface RemovedEntry {
  /** Absolute, as `rm -v` printed it (the agent's bytes). */
  path: string;
  directory: boolean;
}

export interface DeleteResult {
  /** `-p`, NAS-relative. */
  path: string;
  removed: RemovedEntry[];
}

export interface RebaseResult {
  target: string;
  newBacking: string;
  /** false: it already backed onto the new backing (a repeated chain repair). */
  changed: boolean;
}

export interface BackupResult {
  vm: string;
  path: string;
  mode: string;
  /** The agent's parser follows -d: `stopped` (one integer per line) when disks were given, else `running`. */
  format: 'running' | 'stopped';
  report: BackupReport;
  warnings: Warning[];
  /** Running format: the completed domjobinfo block. */
  jobBlock: string;
  /** Stopped format: one size per backup file. */
  files: BackupFileSize[];
}
