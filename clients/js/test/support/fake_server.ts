/**
 * A fake sluice server for unit tests, reached through injected constructors: `server.WebSocket`
 * and `server.fetch` (the SSE endpoints) speak PROTOCOL.md to the client with no network.
 *
 * It keeps real sessions with numbered event logs, welcomes, resume and replay, so reconnect
 * behaviour is tested against the contract. It never produces model output by itself: a test
 * answers requests through `onRequest` / `session.emit`, and breaks connections on purpose.
 */

import type { ClientMessage, LoggedMessage, RequestMessage, Welcome } from '../../src/messages.js';
import type {
  EventSourceConstructor,
  EventSourceLike,
  FetchLike,
  WebSocketConstructor,
} from '../../src/transport.js';

/** A logged message before the server numbers it. */
export type Unnumbered = LoggedMessage extends infer M ? (M extends unknown ? Omit<M, 'seq'> : never) : never;
type Sink = {
  send(message: object): void;
  close(code: number, reason: string): void;
  transport: 'websocket' | 'sse';
};

export class FakeSession {
  readonly log: LoggedMessage[] = [];
  readonly inflight = new Map<string, RequestMessage>();
  readonly received: ClientMessage[] = [];
  live: Sink | undefined;

  constructor(
    readonly id: string,
    private readonly server: FakeServer,
  ) {}

  get lastSeq(): number {
    return this.log.length;
  }

  /** Number, log and (if a transport is attached) send one event; ends the request on a terminal one. */
  emit(message: Unnumbered): LoggedMessage {
    const logged = { ...message, seq: this.log.length + 1 } as LoggedMessage;
    this.log.push(logged);
    const progress = logged.type === 'delta' || logged.type === 'tool_call';
    if ('id' in logged && typeof logged.id === 'string' && !progress) this.inflight.delete(logged.id);
    if (!this.server.holdEvents) this.live?.send(logged);
    return logged;
  }

  delta(id: string, text: string): LoggedMessage {
    return this.emit({ type: 'delta', id, text });
  }

  /** One complete tool call of a generation (`index` and `call_id` as the test says). */
  toolCall(
    id: string,
    index: number,
    name: string,
    args: object,
    call_id = `call-${id}-${index}`,
  ): LoggedMessage {
    return this.emit({ type: 'tool_call', id, index, call_id, name, arguments: JSON.stringify(args) });
  }

  done(id: string, finish_reason: 'stop' | 'length' | 'tool_calls' | 'cancelled' = 'stop'): LoggedMessage {
    return this.emit({
      type: 'done',
      id,
      finish_reason,
      usage: { prompt_tokens: 3, completion_tokens: 5 },
      timings: { queue_ms: 1, ttft_ms: 2, total_ms: 3 },
      model: 'fake-model',
    });
  }

  /** Cut the live transport as a network failure would (the server side notices, the client gets 1006). */
  drop(code = 1006): void {
    const live = this.live;
    this.live = undefined;
    live?.close(code, 'dropped');
  }
}

export interface FakeServerOptions {
  /** WebSocket connections fail before opening (a proxy that refuses the upgrade). */
  refuseWebSocket?: boolean;
  /** WebSocket connections open, then close before any welcome (a proxy that kills them). */
  dropBeforeWelcome?: boolean;
  /** WebSocket connections are closed right after the welcome, this many times. */
  killWebSocketAfterWelcome?: number;
  /** The SSE endpoints answer 404, as a server without them would. */
  noSse?: boolean;
  /** Split each SSE write into chunks of this many bytes. */
  sseChunkBytes?: number;
  /** Refuse POST /v1/sessions with this status and typed body. */
  refuseSession?: { status: number; code: string; message: string };
  /** On resume, also replay this many events the client already has (it must drop them). */
  replayOverlap?: number;
  /** Announced in welcome.limits. */
  sessionTtlS?: number;
  /** Refuse POST /v1/sessions/{id}/messages with this status and typed body. */
  refuseMessages?: { status: number; code: string; message: string };
}

export class FakeServer {
  readonly sessions = new Map<string, FakeSession>();
  readonly sockets: FakeSocket[] = [];
  readonly fetches: { method: string; url: string; body: unknown; headers: Headers }[] = [];
  readonly hellos: { transport: 'websocket' | 'sse'; hello: Record<string, unknown> }[] = [];
  /** Called for each request the server accepts; answer it with `session.emit(...)`. */
  onRequest: (session: FakeSession, request: RequestMessage) => void = () => {};
  /** Called for a cancel of a request in flight; by default it ends the request as the server would. */
  onCancel: (session: FakeSession, request: RequestMessage) => void = (session, request) => {
    if (request.type === 'generate') session.done(request.id, 'cancelled');
    else
      session.emit({
        type: 'error',
        id: request.id,
        code: 'cancelled',
        message: 'cancelled',
        retryable: false,
      });
  };
  /** While true, events are logged but not sent (to build up a replay). */
  holdEvents = false;
  /** Forget every session, as a restarted server would. */
  forgetSessions = false;
  options: FakeServerOptions;
  private nextSession = 0;

  readonly WebSocket: WebSocketConstructor;
  readonly fetch: FetchLike;
  readonly EventSource: EventSourceConstructor;

  constructor(options: FakeServerOptions = {}) {
    this.options = options;
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const server = this;
    this.WebSocket = class extends FakeSocket {
      constructor(url: string, protocols?: string | string[]) {
        super(server, url, protocols);
      }
    };
    this.fetch = (input, init) => this.handleFetch(input, init);
    this.EventSource = class extends FakeEventSource {
      constructor(url: string) {
        super(server, url);
      }
    };
  }

  /** The only session (most tests have one). */
  get session(): FakeSession {
    const first = [...this.sessions.values()].at(-1);
    if (first === undefined) throw new Error('no session yet');
    return first;
  }

  /** Every client message the server received, on any transport and session. */
  get received(): ClientMessage[] {
    return [...this.sessions.values()].flatMap((session) => session.received);
  }

  /** hello → the session to attach and the welcome to send, with the events to replay. */
  attach(
    hello: Record<string, unknown>,
    transport: 'websocket' | 'sse',
  ): { session: FakeSession; welcome: Welcome; replayFrom: number } {
    this.hellos.push({ transport, hello });
    if (this.forgetSessions) {
      this.sessions.clear();
      this.forgetSessions = false;
    }
    const known = typeof hello.session === 'string' ? this.sessions.get(hello.session) : undefined;
    const lastSeq = typeof hello.last_seq === 'number' ? hello.last_seq : 0;
    let session: FakeSession;
    let resumed = false;
    if (known !== undefined && lastSeq <= known.lastSeq) {
      session = known;
      resumed = true;
    } else {
      this.nextSession += 1;
      session = new FakeSession(`s${this.nextSession}`, this);
      this.sessions.set(session.id, session);
    }
    session.drop(4009);
    const welcome: Welcome = {
      type: 'welcome',
      session: session.id,
      resumed,
      last_seq: session.lastSeq,
      protocol: 1,
      server: { name: 'sluice', version: 'fake' },
      limits: {
        max_message_bytes: 1 << 20,
        max_inflight: 64,
        replay_events: 4096,
        session_ttl_s: this.options.sessionTtlS ?? 120,
      },
      models: { generate: ['fake-model'], embed: ['fake-embed'], classify: ['fake-classify'] },
    };
    const overlap = this.options.replayOverlap ?? 0;
    return { session, welcome, replayFrom: resumed ? Math.max(0, lastSeq - overlap) : 0 };
  }

  /** One client message on an attached session, as the real server handles it. */
  handle(session: FakeSession, message: ClientMessage): { accepted?: string } {
    session.received.push(message);
    switch (message.type) {
      case 'generate':
      case 'embed':
      case 'classify':
        if (session.inflight.has(message.id)) {
          session.emit({
            type: 'error',
            ref: message.id,
            code: 'duplicate_id',
            message: 'duplicate id',
            retryable: false,
          });
          return {};
        }
        session.inflight.set(message.id, message);
        this.onRequest(session, message);
        return { accepted: message.id };
      case 'cancel': {
        const request = session.inflight.get(message.id);
        if (request !== undefined) this.onCancel(session, request);
        return {};
      }
      case 'ping':
        session.live?.send({ type: 'pong', nonce: message.nonce });
        return {};
      default:
        return {};
    }
  }

  private async handleFetch(input: string, init: RequestInit = {}): Promise<Response> {
    const url = new URL(input);
    const method = init.method ?? 'GET';
    const body = typeof init.body === 'string' ? (JSON.parse(init.body) as unknown) : undefined;
    this.fetches.push({ method, url: input, body, headers: new Headers(init.headers) });
    await Promise.resolve();
    if (this.options.noSse) return json(404, { detail: 'Not Found' });
    const parts = url.pathname.split('/').filter(Boolean); // v1 sessions {id} events|messages
    if (method === 'POST' && url.pathname === '/v1/sessions') {
      const refuse = this.options.refuseSession;
      if (refuse !== undefined) {
        return json(refuse.status, {
          error: { code: refuse.code, message: refuse.message, retryable: false },
        });
      }
      const { session, welcome } = this.attach(body as Record<string, unknown>, 'sse');
      void session;
      return json(201, welcome);
    }
    const session = parts[2] === undefined ? undefined : this.sessions.get(parts[2]);
    if (session === undefined)
      return json(404, { error: { code: 'invalid_request', message: 'no such session', retryable: false } });
    if (method === 'GET' && parts[3] === 'events') {
      const after = Number(
        url.searchParams.get('last_event_id') ?? new Headers(init.headers).get('last-event-id') ?? 0,
      );
      return this.eventStream(session, after, init.signal ?? undefined);
    }
    if (method === 'POST' && parts[3] === 'messages') {
      const refuse = this.options.refuseMessages;
      if (refuse !== undefined) {
        // As the real server does: the refusal is also a numbered event on the stream (here it
        // comes after the POST's answer, the order that must not report it twice).
        const message = (Array.isArray(body) ? body[0] : body) as { id?: string };
        setTimeout(() => {
          session.emit({
            type: 'error',
            ref: message.id,
            code: refuse.code as 'rate_limited',
            message: refuse.message,
            retryable: false,
          });
        }, 10);
        return json(refuse.status, {
          error: { code: refuse.code, message: refuse.message, retryable: false },
        });
      }
      const messages = (Array.isArray(body) ? body : [body]) as ClientMessage[];
      const accepted = messages
        .map((message) => this.handle(session, message).accepted)
        .filter((id) => id !== undefined);
      return json(202, { accepted });
    }
    if (method === 'DELETE') {
      this.sessions.delete(session.id);
      return new Response(null, { status: 204 });
    }
    return json(405, {});
  }

  private eventStream(session: FakeSession, after: number, signal: AbortSignal | undefined): Response {
    const encoder = new TextEncoder();
    const chunk = this.options.sseChunkBytes;
    let controller!: ReadableStreamDefaultController<Uint8Array>;
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        controller = c;
      },
    });
    let open = true;
    const write = (text: string): void => {
      if (!open) return;
      const bytes = encoder.encode(text);
      const size = chunk ?? bytes.length;
      for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
    };
    const sink: Sink = {
      transport: 'sse',
      send: (message) => {
        const logged = message as LoggedMessage;
        write(`id: ${logged.seq}\nevent: ${logged.type}\ndata: ${JSON.stringify(message)}\n\n`);
      },
      close: (code) => {
        if (!open) return;
        // The real server ends a stream it closes on purpose with `event: close`; a network
        // failure (1006) just ends it.
        if (code !== 1006) write(`event: close\ndata: ${JSON.stringify({ code, reason: 'closed' })}\n\n`);
        open = false;
        controller.close();
      },
    };
    signal?.addEventListener('abort', () => {
      if (session.live === sink) session.live = undefined;
      if (open) {
        open = false;
        controller.error(new DOMException('aborted', 'AbortError'));
      }
    });
    session.drop(4009);
    session.live = sink;
    write(': connected\n\n');
    for (const event of session.log.slice(after)) sink.send(event);
    return new Response(body, { status: 200, headers: { 'content-type': 'text/event-stream' } });
  }
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });
}

/** A WebSocket as the injected constructor sees it, wired to a `FakeServer`. */
export class FakeSocket {
  readyState = 0;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  readonly sent: ClientMessage[] = [];
  session: FakeSession | undefined;
  closedWith: number | undefined;

  constructor(
    private readonly server: FakeServer,
    readonly url: string,
    readonly protocols?: string | string[],
  ) {
    server.sockets.push(this);
    setTimeout(() => {
      if (this.readyState !== 0) return;
      if (server.options.refuseWebSocket) {
        this.end(1006, '');
        return;
      }
      this.readyState = 1;
      this.onopen?.({});
    }, 0);
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    const message = JSON.parse(data) as ClientMessage;
    this.sent.push(message);
    setTimeout(() => this.receive(message), 0);
  }

  close(code = 1000): void {
    if (this.readyState >= 2) return;
    this.closedWith = code;
    if (this.session?.live?.transport === 'websocket' && this.session.live === this.sink)
      this.session.live = undefined;
    this.end(code, '');
  }

  private sink: Sink | undefined;

  private receive(message: ClientMessage): void {
    if (this.readyState !== 1) return;
    if (this.session === undefined && this.server.options.dropBeforeWelcome) {
      this.end(1006, '');
      return;
    }
    if (this.session === undefined) {
      const hello =
        message.type === 'hello' ? (message as unknown as Record<string, unknown>) : { type: 'hello' };
      const { session, welcome, replayFrom } = this.server.attach(hello, 'websocket');
      this.session = session;
      this.sink = {
        transport: 'websocket',
        send: (m) => this.deliver(m),
        close: (code, reason) => this.end(code, reason),
      };
      this.deliver(welcome);
      session.live = this.sink;
      const kills = this.server.options.killWebSocketAfterWelcome ?? 0;
      if (kills > 0) {
        this.server.options.killWebSocketAfterWelcome = kills - 1;
        session.drop(1006);
        return;
      }
      for (const event of session.log.slice(replayFrom)) this.deliver(event);
      if (message.type === 'hello') return;
    }
    this.server.handle(this.session, message);
  }

  private deliver(message: object): void {
    if (this.readyState !== 1) return;
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  private end(code: number, reason: string): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code, reason }), 0);
  }
}

/** An EventSource wired to a `FakeServer`'s event stream (reads it through the fake fetch). */
export class FakeEventSource implements EventSourceLike {
  readyState = 0;
  onopen: ((event: unknown) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  private readonly listeners = new Map<string, ((event: { data: string; lastEventId: string }) => void)[]>();
  private readonly abort = new AbortController();

  constructor(
    server: FakeServer,
    readonly url: string,
  ) {
    void this.run(server);
  }

  addEventListener(type: string, listener: (event: { data: string; lastEventId: string }) => void): void {
    this.listeners.set(type, [...(this.listeners.get(type) ?? []), listener]);
  }

  close(): void {
    this.readyState = 2;
    this.abort.abort();
  }

  private async run(server: FakeServer): Promise<void> {
    const { SseParser } = await import('../../src/sse_parser.js');
    try {
      const response = await server.fetch(this.url, { signal: this.abort.signal });
      this.readyState = 1;
      this.onopen?.({});
      const reader = response.body!.getReader();
      const parser = new SseParser();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        for (const event of parser.feed(value)) {
          for (const listener of this.listeners.get(event.event) ?? [])
            listener({ data: event.data, lastEventId: event.id });
        }
      }
    } catch {
      // aborted or failed: reported below
    }
    if (this.readyState !== 2) {
      this.readyState = 2;
      this.onerror?.({});
    }
  }
}

/** Wait until `predicate` holds, polling; fails the test after `timeoutMs`. */
export async function until(predicate: () => boolean, timeoutMs = 2000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}
