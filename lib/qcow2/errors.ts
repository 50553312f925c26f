// Errors of the qcow2 library. Self-contained on purpose: lib/qcow2 imports
// nothing from the CLI or the operations, which map these codes onto their own.

export type Qcow2ErrorCode =
  | 'QCOW2_IO'
  | 'QCOW2_TRUNCATED'
  | 'QCOW2_BAD_MAGIC'
  | 'QCOW2_UNSUPPORTED_VERSION'
  | 'QCOW2_BAD_HEADER'
  | 'QCOW2_BACKING_NAME'
  | 'QCOW2_CHAIN_MISSING'
  | 'QCOW2_CHAIN_CYCLE'
  | 'QCOW2_CHAIN_TOO_DEEP'
  | 'QCOW2_CHAIN_UNFOLLOWABLE';

export class Qcow2Error extends Error {
  constructor(
    readonly code: Qcow2ErrorCode,
    message: string,
    readonly path?: string,
  ) {
    super(message);
    this.name = 'Qcow2Error';
  }
}
