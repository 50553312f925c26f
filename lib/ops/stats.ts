// -o stats: the mount point, then "<total> <used>" in 1K blocks (fields 2 and 3 of `df -P`).
import { NasbackupError } from '../errors.js';
import { describeFailure, succeeded } from '../exec.js';
import type { NasTarget } from '../nas/session.js';
import type { StatsResult } from '../output.js';
import type { OpContext } from './context.js';

/** Fields 2 and 3 of the data row of `df -P` (the mount source may contain spaces, so count from the right). */
export function parseDfP(text: string): { totalKiB: bigint; usedKiB: bigint } | null {
  const rows = text.split('\n').filter((l) => l.trim() !== '');
  const row = rows[1];
  if (!row) return null;
  // Row: <source> <1024-blocks> <used> <available> <capacity%> <mounted on>
  const m = /^(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+%|-)\s+(.*)$/.exec(row);
  if (!m) return null;
  return { totalKiB: BigInt(m[2]!), usedKiB: BigInt(m[3]!) };
}

export async function statsOperation(ctx: OpContext, args: { nas: NasTarget }): Promise<StatsResult> {
  const nas = await ctx.openNas(args.nas);
  const r = await ctx.runner.run('df', ['-P', nas.mountPoint], { timeoutMs: ctx.config.commandTimeoutMs });
  if (!succeeded(r)) {
    throw new NasbackupError('STATS_FAILED', `Failed to get storage stats of ${nas.mountPoint}`, {
      details: r.stderr.trim() || describeFailure(r),
    });
  }
  const parsed = parseDfP(r.stdout);
  if (!parsed) throw new NasbackupError('STATS_FAILED', 'Cannot parse the output of df -P', { details: r.stdout });
  return { mountPoint: nas.mountPoint, address: args.nas.address, ...parsed };
}
