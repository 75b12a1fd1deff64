/**
 * `SluiceError`, the one error type the client throws or rejects with, and the one place where
 * foreign failures (wire error messages, HTTP error bodies, network exceptions) become one.
 *
 * Callers branch on `code` (a closed set, see `codes.ts`), never on `message` text.
 */

import { CloseCode, type ErrorCode, isRetryable, toErrorCode } from './codes.js';

export interface SluiceErrorInit {
  retryable?: boolean;
  retryAfterMs?: number | undefined;
  /** The request id the error belongs to, or (for refused messages) the id it carried. */
  requestId?: string | undefined;
  cause?: unknown;
}

export class SluiceError extends Error {
  readonly code: ErrorCode;
  readonly retryable: boolean;
  readonly retryAfterMs: number | undefined;
  readonly requestId: string | undefined;

  constructor(code: ErrorCode, message: string, init: SluiceErrorInit = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = 'SluiceError';
    this.code = code;
    this.retryable = init.retryable ?? isRetryable(code);
    this.retryAfterMs = init.retryAfterMs;
    this.requestId = init.requestId;
  }
}

/** The shape shared by a wire `error` message and the `error` object of an HTTP error body. */
interface ErrorFields {
  code?: unknown;
  message?: unknown;
  retryable?: unknown;
  retry_after_ms?: unknown;
  id?: unknown;
  ref?: unknown;
}

/** An `error` message (or HTTP error object) from the server, as a `SluiceError`. */
export function fromWire(fields: ErrorFields): SluiceError {
  const code = toErrorCode(fields.code);
  const message = typeof fields.message === 'string' ? fields.message : code;
  const requestId =
    typeof fields.id === 'string' ? fields.id : typeof fields.ref === 'string' ? fields.ref : undefined;
  return new SluiceError(code, message, {
    retryable: typeof fields.retryable === 'boolean' ? fields.retryable : isRetryable(code),
    retryAfterMs: typeof fields.retry_after_ms === 'number' ? fields.retry_after_ms : undefined,
    requestId,
  });
}

const STATUS_CODES: Readonly<Record<number, ErrorCode>> = {
  400: 'invalid_message',
  401: 'unauthorized',
  403: 'forbidden',
  404: 'invalid_request',
  409: 'duplicate_id',
  413: 'message_too_large',
  422: 'invalid_request',
  429: 'rate_limited',
  502: 'upstream_error',
  503: 'overloaded',
  504: 'timeout',
};

/**
 * An HTTP error response as a `SluiceError`: the typed body `{"error": {code, message, ...}}`
 * when there is one, otherwise a code guessed from the status.
 */
export async function fromResponse(response: Response): Promise<SluiceError> {
  let body: unknown;
  try {
    body = await response.json();
  } catch {
    body = undefined;
  }
  if (typeof body === 'object' && body !== null) {
    const nested = (body as { error?: unknown }).error;
    const fields = typeof nested === 'object' && nested !== null ? nested : body;
    if (typeof (fields as ErrorFields).code === 'string') {
      const error = fromWire(fields as ErrorFields);
      const retryAfter = retryAfterHeader(response);
      if (error.retryAfterMs === undefined && retryAfter !== undefined) {
        return new SluiceError(error.code, error.message, {
          retryable: error.retryable,
          retryAfterMs: retryAfter,
        });
      }
      return error;
    }
  }
  const code = STATUS_CODES[response.status] ?? (response.status >= 500 ? 'internal' : 'invalid_request');
  return new SluiceError(code, `HTTP ${response.status}`, { retryAfterMs: retryAfterHeader(response) });
}

function retryAfterHeader(response: Response): number | undefined {
  const value = response.headers.get('retry-after');
  if (value === null) return undefined;
  const seconds = Number(value);
  return Number.isFinite(seconds) ? seconds * 1000 : undefined;
}

/** A network-level failure (fetch rejected, socket failed) as a retryable `connection_failed`. */
export function connectionFailed(message: string, cause?: unknown): SluiceError {
  return new SluiceError('connection_failed', message, { cause });
}

/**
 * The typed error a close code implies (PROTOCOL.md §3), for the codes that change what the
 * client does next; undefined for the ones after which it simply reconnects and resumes.
 */
export function closeError(code: number, reason: string): SluiceError | undefined {
  switch (code) {
    case CloseCode.policy:
      return new SluiceError('forbidden', reason || 'refused by the server (policy)', { retryable: false });
    case CloseCode.takenOver:
      return new SluiceError('closed', reason || 'the session was taken over by another connection');
    case CloseCode.tooLarge:
      return new SluiceError('message_too_large', reason || 'a message was too large for the server');
    default:
      return undefined;
  }
}
