// The wire JSON examples of docs/agent-contract.md (§8.3), byte for byte. Serialization tests
// compare against these exact strings, so do not reformat them.

export const TAKE_BACKUP = String.raw`[{"org.apache.cloudstack.backup.TakeBackupCommand":{"vmName":"i-2-10-VM","backupPath":"i-2-10-VM/2025.01.04.00.00.00","backupRepoType":"nfs","backupRepoAddress":"10.10.0.5:/export/backup","quiesce":false,"mode":"incremental","bitmapNew":"backup-1736035200","bitmapParent":"backup-1735689600","parentPaths":["i-2-10-VM/2025.01.01.00.00.00/root.b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01.qcow2"],"contextMap":{"logid":"a1b2c3d4"},"wait":0,"bypassHostMaintenance":false}}]`;

export const REBASE_BACKUP = String.raw`[{"org.apache.cloudstack.backup.RebaseBackupCommand":{"targetPath":"i-2-12-VM/2026.04.28.02.00.00/root.5f2c7e1a-0000-4000-8000-000000000001.qcow2","newBackingPath":"i-2-12-VM/2026.04.26.02.00.00/root.5f2c7e1a-0000-4000-8000-000000000001.qcow2","backupRepoType":"nfs","backupRepoAddress":"10.0.0.5:/export/backup","mountOptions":"vers\u003d4.1","contextMap":{"logid":"a1b2c3d4"},"wait":0,"bypassHostMaintenance":false}}]`;

export const DELETE_BACKUP = String.raw`[{"org.apache.cloudstack.backup.DeleteBackupCommand":{"backupPath":"i-2-10-VM/2025.01.02.00.00.00","backupRepoType":"nfs","backupRepoAddress":"10.10.0.5:/export/backup","contextMap":{},"wait":0,"bypassHostMaintenance":false}}]`;

export const ANSWER_INCREMENTAL_OK = String.raw`[{"org.apache.cloudstack.backup.BackupAnswer":{"size":465222,"bitmapCreated":"backup-1736035200","incrementalFallback":false,"result":true,"details":"Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\nFile processed:   128.000 KiB\nFile remaining:   0.000 B\nFile total:       128.000 KiB\n\n465222\nBITMAP_CREATED\u003dbackup-1736035200","contextMap":{},"wait":0,"bypassHostMaintenance":false}}]`;

export const ANSWER_CLEANUP_FAILED = String.raw`[{"org.apache.cloudstack.backup.BackupAnswer":{"needsCleanup":true,"result":false,"details":"Virsh backup job failed\nFailed to unmount /tmp/csbackup.Ab3xZ\nBackup cleanup failed","contextMap":{},"wait":0,"bypassHostMaintenance":false}}]`;

export const ANSWER_ESCAPED_DETAILS = String.raw`[{"org.apache.cloudstack.backup.BackupAnswer":{"result":false,"details":"qemu-img: Could not open \u0027/tmp/csbackup.Ab3xZ/i-2-10-VM/2025.01.03.00.00.00/root.b3f4.qcow2\u0027: Unsupported qcow2 version 9","contextMap":{},"wait":0,"bypassHostMaintenance":false}}]`;

export const ANSWER_REBASE_OR_DELETE_OK = String.raw`[{"org.apache.cloudstack.backup.BackupAnswer":{"result":true,"contextMap":{},"wait":0,"bypassHostMaintenance":false}}]`;

export const STATS_ANSWER = String.raw`[{"org.apache.cloudstack.backup.BackupStorageStatsAnswer":{"totalSize":104857600,"usedSize":52428800,"result":false,"details":"/tmp/csbackup.Ab3xZ\n104857600 52428800\n","contextMap":{},"wait":0,"bypassHostMaintenance":false}}]`;
