// The rebase engine interface, implemented by the native qcow2 engine and qemu-img.

// The setting's values belong to the config (it checks them without loading an engine).
export { ENGINE_MODES, type EngineMode } from '../config.js';

export interface RebaseRequest {
  /** Absolute path of the image to repoint. */
  target: string;
  /** Absolute path of the new backing file. */
  newBacking: string;
  /** What gets written into the header: relative to the target's directory. */
  newBackingName: string;
  newBackingFormat: 'qcow2';
  /** Position of the new backing in the target's current chain (1 = direct), or -1. */
  chainIndex: number;
}

export interface RebaseEngine {
  readonly name: string;
  /** Safe rebase: the guest-visible content of `target` is unchanged. */
  rebase(req: RebaseRequest): Promise<void>;
}
