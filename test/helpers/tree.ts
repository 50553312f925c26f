// Snapshot of a directory tree (type, mode, size, content hash, link target), to
// prove an operation changed nothing — or exactly what it should.
import { createHash } from 'node:crypto';
import { lstatSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';

export interface TreeEntry {
  path: string;
  type: 'dir' | 'file' | 'link' | 'other';
  mode: string;
  size?: number;
  sha256?: string;
  target?: string;
}

export function snapshotTree(root: string): TreeEntry[] {
  const out: TreeEntry[] = [];
  const walk = (rel: string): void => {
    const abs = rel ? join(root, rel) : root;
    for (const name of readdirSync(abs).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      const p = join(root, r);
      const st = lstatSync(p);
      const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
      if (st.isSymbolicLink()) out.push({ path: r, type: 'link', mode, target: readlinkSync(p) });
      else if (st.isDirectory()) {
        out.push({ path: r, type: 'dir', mode });
        walk(r);
      } else if (st.isFile()) {
        out.push({ path: r, type: 'file', mode, size: st.size, sha256: createHash('sha256').update(readFileSync(p)).digest('hex') });
      } else out.push({ path: r, type: 'other', mode });
    }
  };
  walk('');
  return out;
}
