// Public surface of the native qcow2 library (self-contained: no imports from the CLI or operations).
export { Qcow2Error, UNSUPPORTED_CODES, type Qcow2ErrorCode } from './errors.js';
export { decodeHeader, encodeHeader, readHeader, checkReadable, checkWritable, hasExternalDataFile, type Qcow2Header, type HeaderExtension } from './header.js';
export { readChain, indexInChain, isFollowableBackingName, resolveBackingName, type Chain, type ChainLayer } from './chain.js';
export { Qcow2Image, type Extent, type ExtentKind, type ClusterEntry } from './image.js';
export { ImageChain, mapImage, layerExtents, type MapEntry, type ChainExtent } from './view.js';
export { imageInfo, readBitmaps, type ImageInfo, type BitmapInfo } from './info.js';
export { nativeRebase, type NativeRebaseOptions, type NativeRebaseResult, type RebaseHooks } from './rebase.js';
export { NodeBlockFile, openImageFile, type BlockFile } from './io.js';
export { scanImage, scanMetadata, type ScanResult } from './scan.js';
