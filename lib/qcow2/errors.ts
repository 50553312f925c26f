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
  | 'QCOW2_CHAIN_UNFOLLOWABLE'
  /** A valid feature this library does not handle (encryption, zstd without a decoder, …). */
  | 'QCOW2_UNSUPPORTED_FEATURE'
  /** The guest data lives in another file: never read or written through this image. */
  | 'QCOW2_EXTERNAL_DATA_FILE'
  /** A FIFO, socket, character device or folder where an image should be (opening it could block). */
  | 'QCOW2_NOT_A_FILE'
  /** Unknown incompatible feature bits: the spec says refuse to open. */
  | 'QCOW2_UNKNOWN_INCOMPATIBLE'
  /** The image is marked dirty (lazy refcounts after a crash): needs `qemu-img check -r all` before writing. */
  | 'QCOW2_DIRTY'
  /** The image is marked corrupt: read-only. */
  | 'QCOW2_MARKED_CORRUPT'
  /** Internal snapshots present: refused for writing. */
  | 'QCOW2_SNAPSHOTS'
  /** Dirty bitmaps present: never write guest data into such an image. */
  | 'QCOW2_BITMAPS'
  /** Structural damage: misaligned or out-of-file offsets, overlapping metadata, invalid entries. */
  | 'QCOW2_CORRUPT'
  /** A size or count beyond the library's (QEMU's) limits. */
  | 'QCOW2_TOO_LARGE'
  /** A compressed cluster that does not decompress to exactly one cluster. */
  | 'QCOW2_COMPRESSED_DATA'
  /** A read past the virtual disk or a bad argument. */
  | 'QCOW2_RANGE'
  /** The refcount table would have to grow: refused cleanly before any write. */
  | 'QCOW2_REFCOUNT_TABLE_FULL'
  /** The new header (extensions and backing name) does not fit into cluster 0. */
  | 'QCOW2_HEADER_FULL'
  /** The requested rebase shape is not handled natively (new backing not in the chain, …). */
  | 'QCOW2_REBASE_SHAPE'
  /** Injected crash (tests only). */
  | 'QCOW2_CRASH_INJECTED';

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

/**
 * Codes that mean "a valid image outside what the native engine handles": the only ones on which
 * another engine may take over. Damage (QCOW2_CORRUPT, the corrupt bit, truncation, …) and unsafe
 * inputs (external data file, not a file) are never handed on.
 */
export const UNSUPPORTED_CODES: ReadonlySet<Qcow2ErrorCode> = new Set<Qcow2ErrorCode>([
  'QCOW2_UNSUPPORTED_FEATURE',
  'QCOW2_UNKNOWN_INCOMPATIBLE',
  'QCOW2_DIRTY',
  'QCOW2_SNAPSHOTS',
  'QCOW2_BITMAPS',
  'QCOW2_REFCOUNT_TABLE_FULL',
  'QCOW2_HEADER_FULL',
  'QCOW2_REBASE_SHAPE',
  'QCOW2_UNSUPPORTED_VERSION',
]);
