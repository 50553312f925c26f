// Length of the zstd frame at the start of a buffer. A compressed qcow2 cluster is stored in
// whole 512-byte sectors, so the frame is followed by bytes that are not zstd; QEMU's
// streaming decoder stops at the frame's end, Node's one-shot decoder would read on and fail.
// Layout (RFC 8878 §3.1.1): magic, frame header, blocks (3-byte headers), optional checksum.
const ZSTD_MAGIC = 0xfd2fb528;

/** Bytes of the frame at `buf[0..]`, or null when it is not a complete, well-formed frame. */
export function zstdFrameLength(buf: Buffer): number | null {
  if (buf.length < 6 || buf.readUInt32LE(0) !== ZSTD_MAGIC) return null;
  const fhd = buf[4]!;
  if (fhd & 0x08) return null; // reserved bit
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictBytes = [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  let pos = 5 + (single ? 0 : 1) + dictBytes + fcsBytes;
  for (;;) {
    if (pos + 3 > buf.length) return null;
    const h = buf[pos]! | (buf[pos + 1]! << 8) | (buf[pos + 2]! << 16);
    const last = h & 1;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    if (type === 3) return null; // reserved block type
    pos += 3 + (type === 1 ? 1 : size); // RLE blocks store one byte
    if (pos > buf.length) return null;
    if (last) break;
  }
  pos += checksum ? 4 : 0;
  return pos <= buf.length ? pos : null;
}
