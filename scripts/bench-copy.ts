// Benchmark (not a test): the one copy engine against qemu-img and the physical floor.
//   npm run bench:copy [-- --only a --runs 5 --shapes contiguous,fragmented,sparse
//                        --disk 4G --data 2G --sparse-virtual 100G --sparse-data 1G --dir /var/tmp]
// Sections, each in scripts/bench-copy/<file>.ts, selected with --only (default: all):
//   a  stopped full copy (ours through the CLI vs `qemu-img convert -O qcow2` vs the floor)
//   (b offline incremental, c native rebase, d rebase over the shaped NAS: added by their branches)
// Run it as root (caches are dropped between runs) and under flock /tmp/nasbackup-bench.lock.
import { opt } from './bench-copy/common.js';
import { sectionStopped } from './bench-copy/stopped.js';

/** Add a section: a file beside stopped.ts exporting `async () => void`, and one line here. */
const SECTIONS: Record<string, () => Promise<void>> = {
  a: sectionStopped,
};

const only = opt('only', Object.keys(SECTIONS).join(',')).split(',');
for (const [key, run] of Object.entries(SECTIONS)) if (only.includes(key)) await run();
