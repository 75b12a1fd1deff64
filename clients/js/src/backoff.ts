/**
 * Reconnect delays: exponential backoff with full jitter, so that many clients cut off at once
 * by one server restart do not all come back in the same instant. Pure; never sleeps.
 */

export interface BackoffOptions {
  /** Delay floor, and the base that doubles with each failed attempt. */
  readonly minDelayMs: number;
  readonly maxDelayMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { minDelayMs: 250, maxDelayMs: 8_000 };

/** The delay before reconnect attempt `attempt` (0 for the first): uniform in [min, min(max, min·2^(attempt+1))]. */
export function backoffDelay(
  attempt: number,
  options: BackoffOptions = DEFAULT_BACKOFF,
  random = Math.random,
): number {
  const ceiling = Math.min(options.maxDelayMs, options.minDelayMs * 2 ** Math.min(attempt + 1, 30));
  return Math.round(options.minDelayMs + random() * (ceiling - options.minDelayMs));
}
