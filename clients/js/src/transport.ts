/**
 * What every transport implements, and the minimal shapes of the platform constructors they are
 * given (`WebSocket`, `fetch`, `EventSource`), so that tests inject fakes and need no network.
 *
 * A transport carries one connection: it opens, says hello, hands over the `welcome` and then
 * every server message, and reports its end exactly once. It never reconnects, never numbers or
 * deduplicates events and never retries: that is `connection.ts`.
 */

import type { SluiceError } from './errors.js';
import type { ClientMessage, Hello, ServerMessage, Welcome } from './messages.js';

export type TransportName = 'websocket' | 'sse';

// Method-style parameter bivariance lets the DOM's, undici's and the `ws` package's constructors
// all satisfy these shapes without casts.
type Handler<E> = { bivarianceHack(event: E): void }['bivarianceHack'];

export interface WebSocketLike {
  readonly readyState: number;
  onopen: Handler<unknown> | null;
  onmessage: Handler<{ data: unknown }> | null;
  onclose: Handler<{ code: number; reason: string }> | null;
  onerror: Handler<unknown> | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface EventSourceLike {
  readonly readyState: number;
  onopen: Handler<unknown> | null;
  onerror: Handler<unknown> | null;
  addEventListener(type: string, listener: Handler<{ data: string; lastEventId: string }>): void;
  close(): void;
}

export type EventSourceConstructor = new (
  url: string,
  init?: { withCredentials?: boolean },
) => EventSourceLike;

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

/** How a connection ended. Reported once per transport, never after the caller's `close()`. */
export interface TransportClosed {
  /** The WebSocket close code; for SSE the HTTP status of a refusal, or 0. */
  readonly code: number;
  readonly reason: string;
  /** Whether the server's `welcome` had arrived on this connection. */
  readonly welcomed: boolean;
  /** A typed refusal from the server (an `error` before `welcome`, an HTTP error body). */
  readonly error?: SluiceError | undefined;
}

export interface TransportEvents {
  /** The server's `welcome`: the connection now carries messages both ways. */
  welcome(welcome: Welcome): void;
  /** Every server message after the welcome, in the order received. */
  message(message: ServerMessage): void;
  /** The connection is gone; the transport is dead. */
  closed(closed: TransportClosed): void;
  /** SSE only: the server took these request ids (202 `{accepted}`). */
  accepted?(ids: readonly string[]): void;
  /** SSE only: the server refused a POST of these messages with a typed error. */
  refused?(error: SluiceError, messages: readonly ClientMessage[]): void;
  /** The seq to resume the event stream after (SSE reads it once the welcome is in). */
  lastSeq(): number;
}

export interface Transport {
  readonly name: TransportName;
  /** Open the connection and say `hello`. Events arrive through `events`, never synchronously. */
  open(hello: Hello, events: TransportEvents): void;
  /** Send messages in order. False when the connection cannot take them now (nothing was sent). */
  send(messages: readonly ClientMessage[]): boolean;
  /** Close without reporting `closed`. `end` also asks the server to end the session. */
  close(end?: boolean): void;
}

export const WS_SUBPROTOCOL = 'sluice.v1';
