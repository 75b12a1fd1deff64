/**
 * The WebSocket transport: `GET /v1/ws`, one JSON message per text frame (PROTOCOL.md §3).
 *
 * It sends `hello` as soon as the socket opens, waits for `welcome`, then passes every frame up.
 * A frame that is not a known server message is skipped, never fatal. It must never reconnect
 * or retry by itself; the close code goes up as it is, for `connection.ts` to act on.
 */

import { CloseCode } from './codes.js';
import { closeError, fromWire, type SluiceError } from './errors.js';
import type { ClientMessage, Hello } from './messages.js';
import { parseServerMessage } from './messages.js';
import {
  type Transport,
  type TransportEvents,
  type WebSocketConstructor,
  type WebSocketLike,
  WS_SUBPROTOCOL,
} from './transport.js';

const OPEN = 1;

export class WebSocketTransport implements Transport {
  readonly name = 'websocket' as const;
  private socket: WebSocketLike | undefined;
  private closedByUs = false;

  /** `url` is the full `ws(s)://…/v1/ws` address, a `?ticket=` already on it when there is one. */
  constructor(
    private readonly url: string,
    private readonly WebSocket: WebSocketConstructor,
  ) {}

  open(hello: Hello, events: TransportEvents): void {
    let welcomed = false;
    let refusal: SluiceError | undefined;
    let reported = false;
    const report = (code: number, reason: string): void => {
      if (reported || this.closedByUs) return;
      reported = true;
      events.closed({ code, reason, welcomed, error: refusal ?? closeError(code, reason) });
    };

    let socket: WebSocketLike;
    try {
      socket = new this.WebSocket(this.url, WS_SUBPROTOCOL);
    } catch (error) {
      // A malformed URL or a blocked port throws synchronously in browsers: report it like any
      // other failure to open, asynchronously as the interface promises.
      queueMicrotask(() =>
        report(CloseCode.abnormal, error instanceof Error ? error.message : 'cannot open'),
      );
      return;
    }
    this.socket = socket;
    socket.onopen = () => socket.send(JSON.stringify(hello));
    socket.onmessage = (event) => {
      if (typeof event.data !== 'string' || this.closedByUs) return;
      const message = parseServerMessage(event.data);
      if (message === undefined) return;
      if (welcomed) {
        events.message(message);
      } else if (message.type === 'welcome') {
        welcomed = true;
        events.welcome(message);
      } else if (message.type === 'error') {
        // Refused before the welcome (bad token, wrong protocol): the close that follows is
        // explained by this error.
        refusal = fromWire(message);
      }
    };
    socket.onerror = () => {
      // Always followed by a close event, which carries the code.
    };
    socket.onclose = (event) => report(event.code, event.reason);
  }

  send(messages: readonly ClientMessage[]): boolean {
    const socket = this.socket;
    if (socket === undefined || socket.readyState !== OPEN) return false;
    for (const message of messages) socket.send(JSON.stringify(message));
    return true;
  }

  close(): void {
    this.closedByUs = true;
    const socket = this.socket;
    if (socket === undefined) return;
    socket.onopen = null;
    socket.onmessage = null;
    socket.onclose = null;
    try {
      socket.close(CloseCode.normal);
    } catch {
      // Closing a socket that never connected may throw in some runtimes; it is gone either way.
    }
  }
}
