/**
 * The SSE fallback transport (PROTOCOL.md §3): `POST /v1/sessions` says hello and returns the
 * welcome, `GET /v1/sessions/{id}/events` streams the logged events, and client messages go up
 * with `POST /v1/sessions/{id}/messages`, one POST at a time so their order is kept (messages
 * queued meanwhile go together as one JSON array).
 *
 * The event stream is read with fetch streaming (headers, `Last-Event-ID`, an idle timeout) or
 * with an `EventSource` (no headers: auth by `?ticket=`). Either way the browser's own
 * EventSource reconnect is never used: the first error ends the transport and `connection.ts`
 * decides what happens next, so resume goes through one code path for every transport.
 */

import { closeError, connectionFailed, fromResponse, type SluiceError } from './errors.js';
import { asServerMessage, type ClientMessage, type Hello, parseServerMessage } from './messages.js';
import { SseParser } from './sse_parser.js';
import type {
  EventSourceConstructor,
  EventSourceLike,
  FetchLike,
  Transport,
  TransportEvents,
} from './transport.js';

export interface SseTransportOptions {
  /** Base URL of the server, `http(s)://host:port` (no trailing slash). */
  readonly baseUrl: string;
  readonly fetch: FetchLike;
  /** Given: read events with it. Absent: read them with fetch streaming. */
  readonly EventSource?: EventSourceConstructor | undefined;
  /** API key, sent as `Authorization: Bearer` on every fetch (never in a URL). */
  readonly token?: string | undefined;
  /** Single-use ticket for the events URL (`?ticket=`): how an EventSource, which cannot send headers, authenticates. */
  readonly ticket?: string | undefined;
  /** Fetch streaming only: end the transport when nothing (not even a keep-alive) came for this long. */
  readonly idleTimeoutMs?: number | undefined;
}

// The server comments every 15 s; three missed keep-alives mean the stream is dead.
const DEFAULT_IDLE_TIMEOUT_MS = 45_000;
const EVENT_TYPES = [
  'delta',
  'done',
  'embedding',
  'classification',
  'error',
  'goaway',
  'pong',
  'close',
  'message',
];

export class SseTransport implements Transport {
  readonly name = 'sse' as const;
  private session: string | undefined;
  private events: TransportEvents | undefined;
  private readonly abort = new AbortController();
  private source: EventSourceLike | undefined;
  private idleTimer: ReturnType<typeof setTimeout> | undefined;
  private outbox: ClientMessage[] = [];
  private posting = false;
  private welcomed = false;
  private finished = false;

  constructor(private readonly options: SseTransportOptions) {}

  open(hello: Hello, events: TransportEvents): void {
    this.events = events;
    void this.start(hello).catch((error: unknown) =>
      this.finish(0, 'cannot open the event stream', toError(error)),
    );
  }

  send(messages: readonly ClientMessage[]): boolean {
    if (this.finished || this.session === undefined) return false;
    this.outbox.push(...messages);
    if (!this.posting) void this.post();
    return true;
  }

  close(end = false): void {
    if (end && this.session !== undefined) {
      // Best effort: the session expires on the server anyway.
      this.fetch(this.url(`/v1/sessions/${encodeURIComponent(this.session)}`), { method: 'DELETE' }).catch(
        () => {},
      );
    }
    this.finished = true;
    this.stop();
  }

  private async start(hello: Hello): Promise<void> {
    const response = await this.fetch(this.url('/v1/sessions'), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(hello),
    });
    if (response.status === 404 || response.status === 405) {
      const error = connectionFailed(`the server offers no SSE sessions (HTTP ${response.status})`);
      this.finish(response.status, 'no SSE endpoint', error);
      return;
    }
    if (!response.ok) {
      this.finish(response.status, 'session refused', await fromResponse(response));
      return;
    }
    const welcome = asServerMessage({ type: 'welcome', ...((await response.json()) as object) });
    if (welcome?.type !== 'welcome') {
      this.finish(response.status, 'not a welcome');
      return;
    }
    if (this.finished) return;
    this.session = welcome.session;
    this.welcomed = true;
    this.events?.welcome(welcome);
    if (this.finished) return;
    const after = this.events?.lastSeq() ?? 0;
    if (this.options.EventSource === undefined) await this.streamWithFetch(after);
    else this.streamWithEventSource(this.options.EventSource, after);
  }

  private async streamWithFetch(after: number): Promise<void> {
    const response = await this.fetch(this.eventsUrl(after), {
      headers: { accept: 'text/event-stream', 'last-event-id': String(after) },
      signal: this.abort.signal,
    });
    if (!response.ok || response.body === null) {
      this.finish(
        response.status,
        'event stream refused',
        response.ok ? undefined : await fromResponse(response),
      );
      return;
    }
    const reader = response.body.getReader();
    const parser = new SseParser();
    this.touch();
    for (;;) {
      const { done, value } = await reader.read();
      if (this.finished) return;
      const events = done ? parser.end() : parser.feed(value);
      this.touch();
      for (const event of events) {
        this.deliver(event.event, event.data);
        if (this.finished) return;
      }
      if (done) break;
    }
    this.finish(0, 'event stream ended');
  }

  private streamWithEventSource(EventSource: EventSourceConstructor, after: number): void {
    const source = new EventSource(this.eventsUrl(after));
    this.source = source;
    for (const type of EVENT_TYPES) source.addEventListener(type, (event) => this.deliver(type, event.data));
    source.onerror = () => this.finish(0, 'event stream failed');
  }

  private deliver(type: string, data: string): void {
    if (this.finished) return;
    if (type === 'close') {
      // The server's last word on this stream, with a WebSocket close code (4009: taken over).
      const { code, reason } = parseClose(data);
      this.finish(code, reason, closeError(code, reason));
      return;
    }
    const message = parseServerMessage(data);
    if (message !== undefined) this.events?.message(message);
  }

  /** Send everything queued as one POST, then the next batch, until the queue is empty. */
  private async post(): Promise<void> {
    this.posting = true;
    try {
      while (this.outbox.length > 0 && !this.finished && this.session !== undefined) {
        const batch = this.outbox;
        this.outbox = [];
        let response: Response;
        try {
          response = await this.fetch(this.url(`/v1/sessions/${encodeURIComponent(this.session)}/messages`), {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify(batch.length === 1 ? batch[0] : batch),
          });
        } catch (error) {
          // The server may or may not have them; the connection resends unconfirmed requests.
          this.finish(0, 'cannot post messages', connectionFailed('cannot post messages', error));
          return;
        }
        if (response.ok) {
          const accepted = await response.json().then(
            (body: unknown) => (body as { accepted?: unknown }).accepted,
            () => undefined,
          );
          if (Array.isArray(accepted)) {
            this.events?.accepted?.(accepted.filter((id): id is string => typeof id === 'string'));
          }
        } else if (response.status === 404 || response.status === 410) {
          this.finish(response.status, 'session gone', await fromResponse(response));
          return;
        } else {
          this.events?.refused?.(await fromResponse(response), batch);
        }
      }
    } finally {
      this.posting = false;
    }
  }

  private touch(): void {
    if (this.idleTimer !== undefined) clearTimeout(this.idleTimer);
    if (this.finished) return;
    const timeout = this.options.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
    this.idleTimer = setTimeout(() => this.finish(0, 'event stream idle'), timeout);
  }

  private finish(code: number, reason: string, error?: SluiceError): void {
    if (this.finished) return;
    this.finished = true;
    this.stop();
    this.events?.closed({ code, reason, welcomed: this.welcomed, error });
  }

  private stop(): void {
    if (this.idleTimer !== undefined) clearTimeout(this.idleTimer);
    this.idleTimer = undefined;
    this.abort.abort();
    this.source?.close();
    this.source = undefined;
  }

  private fetch(url: string, init: RequestInit): Promise<Response> {
    const headers = new Headers(init.headers);
    if (this.options.token !== undefined) headers.set('authorization', `Bearer ${this.options.token}`);
    return this.options.fetch(url, { ...init, headers });
  }

  private eventsUrl(after: number): string {
    const params = new URLSearchParams({ last_event_id: String(after) });
    if (this.options.ticket !== undefined) params.set('ticket', this.options.ticket);
    return this.url(`/v1/sessions/${encodeURIComponent(this.session ?? '')}/events?${params.toString()}`);
  }

  private url(path: string): string {
    return this.options.baseUrl + path;
  }
}

function toError(error: unknown): SluiceError {
  return connectionFailed(error instanceof Error ? error.message : 'network error', error);
}

function parseClose(data: string): { code: number; reason: string } {
  try {
    const body = JSON.parse(data) as { code?: unknown; reason?: unknown };
    return {
      code: typeof body.code === 'number' ? body.code : 0,
      reason: typeof body.reason === 'string' ? body.reason : 'closed by the server',
    };
  } catch {
    return { code: 0, reason: 'closed by the server' };
  }
}
