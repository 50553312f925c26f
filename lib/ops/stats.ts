// -o stats: the mount point, then "<total> <used>" in 1K blocks (fields 2 and 3 of `df -P`).
import type { NasTarget } from '../nas/session.js';
import type { StatsResult } from '../output.js';
import type { OpContext } from './context.js';

export async function statsOperation(ctx: OpContext, args: { nas: NasTarget }): Promise<StatsResult> {
  const nas = await ctx.openNas(args.nas);
  const parsed = await ctx.clients.host.diskUsage(nas.mountPoint);
  return { mountPoint: nas.mountPoint, address: args.nas.address, ...parsed };
}
