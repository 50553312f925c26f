// libvirt backup and checkpoint XML, built with an XML library so names and paths
// are always escaped (the original interpolated them into strings).
import { create } from 'xmlbuilder2';

export interface BackupDiskTarget {
  /** libvirt target name, e.g. vda. */
  name: string;
  /** Absolute path of the push target file. */
  file: string;
}

export function backupXml(disks: BackupDiskTarget[], incrementalFrom: string | null): string {
  const root = create().ele('domainbackup', { mode: 'push' });
  if (incrementalFrom !== null) root.ele('incremental').txt(incrementalFrom);
  const list = root.ele('disks');
  for (const d of disks) {
    const disk = list.ele('disk', { name: d.name, backup: 'yes', type: 'file' });
    disk.ele('driver', { type: 'qcow2' });
    disk.ele('target', { file: d.file });
  }
  return root.end({ headless: true, prettyPrint: true }) + '\n';
}

/** A new checkpoint created atomically with the backup (--checkpointxml). */
export function checkpointXml(name: string, diskNames: string[]): string {
  const root = create().ele('domaincheckpoint');
  root.ele('name').txt(name);
  const list = root.ele('disks');
  for (const d of diskNames) list.ele('disk', { name: d, checkpoint: 'bitmap' });
  return root.end({ headless: true, prettyPrint: true }) + '\n';
}

/**
 * Register an existing checkpoint whose bitmap is already in every disk (a transient
 * domain forgets its checkpoints on restart; the bitmaps stay in the qcow2).
 */
export function redefineCheckpointXml(name: string, creationTime: number, diskNames: string[]): string {
  const root = create().ele('domaincheckpoint');
  root.ele('name').txt(name);
  root.ele('creationTime').txt(String(creationTime));
  const list = root.ele('disks');
  for (const d of diskNames) list.ele('disk', { name: d, checkpoint: 'bitmap', bitmap: name });
  return root.end({ headless: true, prettyPrint: true }) + '\n';
}
