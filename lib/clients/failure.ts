// A failed call of an external tool, as the coded error the clients throw. The message
// says which call failed and why; `details` is the tool's own text (what the agent
// reads below the message). `reason` and `output` keep the one-line cause and the raw
// output for the few callers that word their own message around them.
import { NasbackupError, type ErrorCode } from '../errors.js';
import { describeFailure, failureText, type RunResult } from '../exec.js';

export class ToolError extends NasbackupError {
  /** Why the call failed, in one line (`virsh exited with code 1`, `… timed out after 5 s`). */
  readonly reason: string;
  /** stderr, else stdout, untrimmed. */
  readonly output: string;
  readonly canceled: boolean;
  readonly timedOut: boolean;

  constructor(code: ErrorCode, message: string, r: RunResult | null, details: string) {
    super(code, message, { details });
    this.name = 'ToolError';
    this.reason = r ? describeFailure(r) : message;
    this.output = r ? r.stderr || r.stdout : '';
    this.canceled = r?.canceled ?? false;
    this.timedOut = r?.timedOut ?? false;
  }
}

/** The usual shape: `<what> failed (<reason>)` and the tool's text as details. */
export function toolFailure(code: ErrorCode, what: string, r: RunResult): ToolError {
  return new ToolError(code, `${what} failed (${describeFailure(r)})`, r, failureText(r));
}

/**
 * For calls whose failure is only logged or turns into a fallback: null when it
 * succeeded, else the tool's text. Anything that is not a tool failure propagates.
 */
export async function softly(call: Promise<unknown>): Promise<string | null> {
  try {
    await call;
    return null;
  } catch (e) {
    if (e instanceof ToolError) return e.details;
    throw e;
  }
}
