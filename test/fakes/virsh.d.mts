// Types of what test/fakes/virsh.mjs exports (run as a program, it is `virsh`).

/** Render the fake's fast answers (served by the `virsh` shim) for the state file at `path`. */
export function renderFastAnswers(path: string): void;
