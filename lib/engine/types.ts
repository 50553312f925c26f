// The rebase engine interface: qemu-img today, a native qcow2 engine later.

/** --engine / NASBACKUP_ENGINE (pure here so the config can check it without loading an engine). */
export const ENGINE_MODES = ['auto', 'native', 'qemu-img'] as const;
export type EngineMode = (typeof ENGINE_MODES)[number];

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
