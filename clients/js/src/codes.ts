/**
 * The closed sets of error codes a caller can see, and which of them are worth retrying.
 *
 * `ProtocolErrorCode` is PROTOCOL.md's list, exactly (a test pins it against the server's JSON
 * Schema). `ClientErrorCode` names the few failures only the client can observe: no transport
 * could be opened, the server no longer knew the session, or the caller closed it. Nothing else
 * may ever appear in `SluiceError.code`; this module holds data only and never does I/O.
 */

export const PROTOCOL_ERROR_CODES = [
  'invalid_message',
  'unknown_type',
  'unsupported_protocol',
  'duplicate_id',
  'message_too_large',
  'too_many_inflight',
  'unauthorized',
  'forbidden',
  'rate_limited',
  'invalid_request',
  'model_not_found',
  'upstream_unavailable',
  'upstream_error',
  'overloaded',
  'timeout',
  'cancelled',
  'slow_consumer',
  'shutting_down',
  'internal',
] as const;

export type ProtocolErrorCode = (typeof PROTOCOL_ERROR_CODES)[number];

export const CLIENT_ERROR_CODES = [
  /** No transport could be opened, or the connection stayed down past the session's TTL. */
  'connection_failed',
  /** The server answered a resume with a new session: requests in flight there were lost. */
  'session_lost',
  /** The caller closed the session (or another connection took it over, close code 4009). */
  'closed',
] as const;

export type ClientErrorCode = (typeof CLIENT_ERROR_CODES)[number];

export type ErrorCode = ProtocolErrorCode | ClientErrorCode;

// Mirrors protocol/errors.py: sending the same message again later can succeed for these.
const RETRYABLE: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'too_many_inflight',
  'rate_limited',
  'upstream_unavailable',
  'overloaded',
  'timeout',
  'slow_consumer',
  'shutting_down',
  'connection_failed',
  'session_lost',
]);

const KNOWN: ReadonlySet<string> = new Set<string>([...PROTOCOL_ERROR_CODES, ...CLIENT_ERROR_CODES]);

/** Whether an error with this code is retryable when the server said nothing more specific. */
export function isRetryable(code: ErrorCode): boolean {
  return RETRYABLE.has(code);
}

/** Narrow a code read off the wire; an unknown one (a newer server) becomes `internal`. */
export function toErrorCode(value: unknown): ErrorCode {
  return typeof value === 'string' && KNOWN.has(value) ? (value as ErrorCode) : 'internal';
}

/** WebSocket close codes of PROTOCOL.md §3 that the client acts on. */
export const CloseCode = {
  normal: 1000,
  goingAway: 1001,
  abnormal: 1006,
  policy: 1008,
  tooLarge: 1009,
  internal: 1011,
  restart: 1012,
  slowConsumer: 4008,
  takenOver: 4009,
} as const;
