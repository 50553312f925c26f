// compat's one error type. `code` is stable (tests and the agent entry match on it);
// `message` is what ends up in a failed answer's details, so it must explain itself.

export type CompatErrorCode =
  | 'MALFORMED_JSON' // stdin is not JSON
  | 'NOT_A_COMMAND_ARRAY' // JSON, but not Gson's [{"<FQCN>":{…}}, …]
  | 'EMPTY_REQUEST' // [] carries no command
  | 'UNKNOWN_CLASS' // a FQCN this layer does not model
  | 'MISSING_FIELD' // a field the wrapper cannot do without
  | 'INVALID_FIELD' // a field Gson itself would refuse to bind (wrong JSON type, out of range)
  | 'UNKNOWN_PROFILE' // --profile / NASBACKUP_AGENT_PROFILE not one of the modelled generations
  | 'BAD_AGENT_ARGS'; // `nasbackup agent` got arguments it does not know

export class CompatError extends Error {
  readonly code: CompatErrorCode;

  constructor(code: CompatErrorCode, message: string) {
    super(message);
    this.name = 'CompatError';
    this.code = code;
  }
}

export const isCompatError = (e: unknown): e is CompatError => e instanceof CompatError;
