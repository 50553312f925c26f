// The clients an operation gets: every program it starts goes through one of them (and
// through the one Runner they share), never through a raw process result.
import type { Config } from '../config.js';
import type { Runner } from '../exec.js';
import { HostClient } from './host.js';
import { MountClient } from './mount.js';
import { BlockClient } from './nbd.js';
import { QemuImgClient } from './qemu-img.js';
import { VirshClient } from './virsh.js';

export interface Clients {
  virsh: VirshClient;
  qemuImg: QemuImgClient;
  host: HostClient;
  block: BlockClient;
  mount: MountClient;
}

export function makeClients(runner: Runner, config: Config): Clients {
  return {
    virsh: new VirshClient(runner, config.virshBinary, config.commandTimeoutMs),
    qemuImg: new QemuImgClient(runner, config.qemuImgBinary, config.qemuImgTimeoutMs),
    host: new HostClient(runner, config.commandTimeoutMs),
    block: new BlockClient(runner, config.commandTimeoutMs),
    mount: new MountClient(runner),
  };
}
