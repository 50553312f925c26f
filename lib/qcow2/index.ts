// Public surface of the native qcow2 library, and the only module the rest of nasbackup
// imports from it (self-contained: nothing here imports from the CLI or the operations).
export { Qcow2Error, UNSUPPORTED_CODES, type Qcow2ErrorCode } from './errors.js';
export {
  decodeHeader,
  encodeHeader,
  encodeAutoclear,
  encodeBackingFormatExtension,
  encodeBackingPointer,
  encodeRefcountTablePointer,
  readHeader,
  checkReadable,
  checkWritable,
  hasExternalDataFile,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  type Qcow2Header,
  type HeaderExtension,
  type HeaderPatch,
} from './header.js';
export { decodeL2Entry, encodeL2Entry, type L2Entry, type L2Layout } from './l2.js';
export {
  readChain,
  indexInChain,
  isFollowableBackingName,
  resolveBackingName,
  MAX_CHAIN_DEPTH,
  type Chain,
  type ChainLayer,
} from './chain.js';
export { Qcow2Image, type Extent, type ExtentKind, type ClusterEntry } from './image.js';
export { ImageChain, mapImage, layerExtents, type MapEntry, type ChainExtent } from './view.js';
export { imageInfo, readBitmaps, type ImageInfo, type BitmapInfo } from './info.js';
export {
  readBitmapDirectory,
  findBitmap,
  dirtyRanges,
  expectedTableSize,
  MIN_GRANULARITY_BITS,
  MAX_GRANULARITY_BITS,
  type DirtyBitmap,
  type BitmapDirectory,
  type GuestRange,
} from './bitmaps.js';
export { nativeRebase, type NativeRebaseOptions, type NativeRebaseResult, type RebaseHooks } from './rebase.js';
export { markPageAligned, NodeBlockFile, openImageFile, pageAlignedBuffers, type BlockFile } from './io.js';
export { Ahead } from './ahead.js';
export { scanImage, scanMetadata, type ScanResult } from './scan.js';
export { Qcow2Writer, type Qcow2WriterOptions, type Qcow2WriterResult } from './create.js';
export {
  copyImage,
  normalizeRanges,
  DEFAULT_BUFFERS,
  DEFAULT_REQUEST_BYTES,
  type CopySource,
  type CopySink,
  type CopyRun,
  type CopyRange,
  type CopyOptions,
  type CopyStats,
  type CopyBufferPool,
} from './copy/engine.js';
export { RawFileSink, BlockDeviceSink } from './copy/sinks.js';
export { checkImage, describeCheck, type Qcow2CheckResult, type CheckVerdict, type CheckOptions } from './check.js';
