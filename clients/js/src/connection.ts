/**
 * One logical connection to a sluice session that survives its transports: it opens a transport
 * (WebSocket first, SSE when the WebSocket cannot be held), reconnects with backoff and jitter,
 * resumes with `hello {session, last_seq}`, and delivers every logged event exactly once, in seq
 * order (a replayed event is dropped, a gap forces a resume from what was received).
 *
 * It knows nothing of requests: `session.ts` routes the events it delivers. It must never
 * deliver an event twice or out of order, and never retry a refusal that cannot succeed
 * (unauthorized, forbidden, unsupported protocol, a session taken over).
 */

import { type BackoffOptions, backoffDelay, DEFAULT_BACKOFF } from './backoff.js';
import type { ErrorCode } from './codes.js';
import { connectionFailed, SluiceError } from './errors.js';
import {
  type ClientMessage,
  type Hello,
  isLogged,
  type LoggedMessage,
  PROTOCOL_VERSION,
  type ServerMessage,
  type Welcome,
} from './messages.js';
import type {
  EventSourceConstructor,
  FetchLike,
  Transport,
  TransportClosed,
  TransportName,
  WebSocketConstructor,
} from './transport.js';
import { SseTransport } from './transport_sse.js';
import { WebSocketTransport } from './transport_websocket.js';

export type TransportChoice = 'auto' | TransportName;
export type ConnectionState = 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface ConnectionOptions {
  /** Server base URL (`http(s)://host:port`, a `ws(s)://` one works too). Default: the page's origin. */
  url?: string;
  /** API key: `hello.token` on a WebSocket, `Authorization: Bearer` on SSE requests. */
  token?: string;
  /** Single-use ticket for the WebSocket / EventSource URL; a function is asked once per connection. */
  ticket?: string | (() => string | Promise<string>);
  transport?: TransportChoice;
  WebSocket?: WebSocketConstructor;
  fetch?: FetchLike;
  /** Given (or `sse: 'eventsource'`): SSE reads events with it; otherwise with fetch streaming. */
  EventSource?: EventSourceConstructor;
  sse?: 'fetch' | 'eventsource';
  /** Shown to the server in `hello.client`. */
  client?: string;
  /** Resume this session (e.g. after a page reload) instead of opening a new one. */
  session?: string;
  lastSeq?: number;
  /** How long to wait for `welcome` on a new transport. */
  openTimeoutMs?: number;
  reconnect?: Partial<BackoffOptions>;
  /** Auto mode: after this many WebSocket connections in a row die young, use SSE. */
  fallbackAfter?: number;
  /** A WebSocket that dies sooner than this after its welcome counts as killed (auto mode). */
  killWindowMs?: number;
  /** Send `ack` this often while events arrive (0: never). */
  ackIntervalMs?: number;
  /** SSE fetch streaming: give up on a stream silent for this long. */
  sseIdleTimeoutMs?: number;
}

export interface StateChange {
  readonly state: ConnectionState;
  readonly transport: TransportName | undefined;
  readonly session: string | undefined;
  /** Reconnecting: which attempt this is, and how long until it starts. */
  readonly attempt?: number;
  readonly delayMs?: number;
  /** Why the last transport ended, when it was an error. */
  readonly error?: SluiceError | undefined;
}

/** How a welcome relates to what came before it. */
export type WelcomeKind = 'new' | 'resumed' | 'replaced';

export interface ConnectionHandlers {
  welcome(welcome: Welcome, kind: WelcomeKind): void;
  event(message: LoggedMessage): void;
  state(change: StateChange): void;
  /** Disconnected for longer than the session's TTL: what was in flight cannot come back. */
  expired(): void;
  /** The connection ended for good (the caller's close, or a refusal that retrying cannot fix). */
  closed(error: SluiceError): void;
  accepted(ids: readonly string[]): void;
  refused(error: SluiceError, messages: readonly ClientMessage[]): void;
}

const FATAL: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'unauthorized',
  'forbidden',
  'unsupported_protocol',
  'closed',
]);
const ACK_EVERY_EVENTS = 512;

export class Connection {
  state: ConnectionState = 'connecting';
  sessionId: string | undefined;
  lastSeq: number;
  welcome: Welcome | undefined;
  transportName: TransportName | undefined;

  private readonly options: ConnectionOptions;
  private readonly baseUrl: string;
  private transport: Transport | undefined;
  private generation = 0;
  private attempt = 0;
  private useSse: boolean;
  private wsStrikes = 0;
  private welcomedAt = 0;
  private goawayDelayMs: number | undefined;
  private ackedSeq = 0;
  private disconnectedAt: number | undefined;
  private initial:
    { resolve(w: Welcome): void; reject(e: SluiceError): void; left: TransportName[] } | undefined;
  private openTimer: ReturnType<typeof setTimeout> | undefined;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private ackTimer: ReturnType<typeof setInterval> | undefined;
  private expiryTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    options: ConnectionOptions,
    private readonly handlers: ConnectionHandlers,
  ) {
    this.options = options;
    this.baseUrl = baseUrl(options.url);
    this.sessionId = options.session;
    this.lastSeq = options.session === undefined ? 0 : (options.lastSeq ?? 0);
    this.useSse = options.transport === 'sse';
  }

  /** Open the first transport that gets a welcome; rejects when every candidate failed. */
  start(): Promise<Welcome> {
    const candidates: TransportName[] =
      this.options.transport === 'websocket'
        ? ['websocket']
        : this.options.transport === 'sse' || this.WebSocket === undefined
          ? ['sse']
          : ['websocket', 'sse'];
    return new Promise<Welcome>((resolve, reject) => {
      this.initial = { resolve, reject, left: candidates.slice(1) };
      this.emit({ state: 'connecting', transport: candidates[0] });
      void this.open(candidates[0] ?? 'sse');
    });
  }

  /** Hand messages to the live transport. False when there is none now: the caller keeps them. */
  send(messages: readonly ClientMessage[]): boolean {
    if (this.state !== 'connected' || this.transport === undefined || messages.length === 0) return false;
    return this.transport.send(messages);
  }

  /** End the connection for good (and the session on the server, where the transport can say so). */
  close(error: SluiceError = new SluiceError('closed', 'the session was closed')): void {
    if (this.state === 'closed') return;
    this.generation += 1;
    this.transport?.close(true);
    this.transport = undefined;
    this.clearTimers();
    this.state = 'closed';
    this.initial?.reject(error);
    this.initial = undefined;
    this.emit({ state: 'closed', error });
    this.handlers.closed(error);
  }

  /** Drop the live transport and resume on a new one now (a gap in seq, a stalled stream). */
  restart(reason: string): void {
    const transport = this.transport;
    if (transport === undefined || this.state !== 'connected') return;
    transport.close();
    this.onClosed(this.generation, transport.name, { code: 0, reason, welcomed: true });
  }

  private get WebSocket(): WebSocketConstructor | undefined {
    return this.options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  }

  private async open(name: TransportName): Promise<void> {
    const generation = ++this.generation;
    const closed = (info: TransportClosed): void => this.onClosed(generation, name, info);
    let ticket: string | undefined;
    try {
      const option = this.options.ticket;
      ticket = typeof option === 'function' ? await option() : option;
    } catch (error) {
      closed({
        code: 0,
        reason: 'no ticket',
        welcomed: false,
        error: connectionFailed('cannot get a ticket', error),
      });
      return;
    }
    if (generation !== this.generation) return;
    let transport: Transport;
    try {
      transport = this.makeTransport(name, ticket);
    } catch (error) {
      closed({
        code: 0,
        reason: 'no transport',
        welcomed: false,
        error: error instanceof SluiceError ? error : undefined,
      });
      return;
    }
    this.transport = transport;
    this.transportName = name;
    this.openTimer = setTimeout(() => {
      transport.close();
      closed({ code: 0, reason: 'no welcome in time', welcomed: false });
    }, this.options.openTimeoutMs ?? 10_000);
    transport.open(this.hello(name), {
      welcome: (welcome) => this.onWelcome(generation, name, welcome),
      message: (message) => this.onMessage(generation, message),
      closed,
      accepted: (ids) => generation === this.generation && this.handlers.accepted(ids),
      refused: (error, messages) => generation === this.generation && this.handlers.refused(error, messages),
      lastSeq: () => this.lastSeq,
    });
  }

  private makeTransport(name: TransportName, ticket: string | undefined): Transport {
    if (name === 'websocket') {
      const WebSocket = this.WebSocket;
      if (WebSocket === undefined) throw new SluiceError('connection_failed', 'no WebSocket constructor');
      const url = `${this.baseUrl.replace(/^http/, 'ws')}/v1/ws`;
      return new WebSocketTransport(
        ticket === undefined ? url : `${url}?ticket=${encodeURIComponent(ticket)}`,
        WebSocket,
      );
    }
    const fetch = this.options.fetch ?? globalFetch();
    const EventSource =
      this.options.sse === 'fetch'
        ? undefined
        : (this.options.EventSource ??
          (this.options.sse === 'eventsource' || !canStream()
            ? (globalThis as { EventSource?: EventSourceConstructor }).EventSource
            : undefined));
    return new SseTransport({
      baseUrl: this.baseUrl,
      fetch,
      EventSource,
      token: this.options.token,
      ticket,
      idleTimeoutMs: this.options.sseIdleTimeoutMs,
    });
  }

  private hello(name: TransportName): Hello {
    const hello: Hello = { type: 'hello', protocol: PROTOCOL_VERSION };
    if (this.sessionId !== undefined) {
      hello.session = this.sessionId;
      hello.last_seq = this.lastSeq;
    }
    // Over SSE the key goes in the Authorization header of every request instead.
    if (name === 'websocket' && this.options.token !== undefined) hello.token = this.options.token;
    if (this.options.client !== undefined) hello.client = this.options.client;
    return hello;
  }

  private onWelcome(generation: number, name: TransportName, welcome: Welcome): void {
    if (generation !== this.generation) return;
    clearTimeout(this.openTimer);
    const previous = this.sessionId;
    const resumed = previous !== undefined && welcome.resumed && welcome.session === previous;
    if (!resumed) {
      this.lastSeq = welcome.last_seq;
      this.ackedSeq = welcome.last_seq;
    }
    this.sessionId = welcome.session;
    this.welcome = welcome;
    this.welcomedAt = Date.now();
    this.attempt = 0;
    this.goawayDelayMs = undefined;
    this.disconnectedAt = undefined;
    clearTimeout(this.expiryTimer);
    if (name === 'sse' && this.options.transport !== 'websocket') this.useSse = true;
    this.state = 'connected';
    this.startAcks();
    const initial = this.initial;
    this.initial = undefined;
    this.emit({ state: 'connected', transport: name });
    this.handlers.welcome(welcome, previous === undefined ? 'new' : resumed ? 'resumed' : 'replaced');
    initial?.resolve(welcome);
  }

  private onMessage(generation: number, message: ServerMessage): void {
    if (generation !== this.generation || !isLogged(message)) return;
    if (message.seq <= this.lastSeq) return;
    if (message.seq !== this.lastSeq + 1) {
      this.restart(`gap after seq ${this.lastSeq}`);
      return;
    }
    this.lastSeq = message.seq;
    if (message.type === 'goaway') this.goawayDelayMs = message.retry_after_ms;
    this.handlers.event(message);
    if (this.lastSeq - this.ackedSeq >= ACK_EVERY_EVENTS) this.ack();
  }

  private onClosed(generation: number, name: TransportName, info: TransportClosed): void {
    if (generation !== this.generation || this.state === 'closed') return;
    this.generation += 1;
    this.transport = undefined;
    clearTimeout(this.openTimer);
    this.stopAcks();
    const fatal = info.error !== undefined && FATAL.has(info.error.code);
    const initial = this.initial;
    if (initial !== undefined) {
      const next = initial.left.shift();
      if (fatal || next === undefined) {
        this.close(info.error ?? connectionFailed(`cannot connect: ${info.reason}`));
      } else {
        this.emit({ state: 'connecting', transport: next, error: info.error });
        void this.open(next);
      }
      return;
    }
    if (fatal && info.error !== undefined) {
      this.close(info.error);
      return;
    }
    if (this.options.transport === 'auto' || this.options.transport === undefined)
      this.chooseFallback(name, info);
    this.scheduleReconnect(info.error);
  }

  /** Auto mode: a WebSocket that keeps dying young (a proxy killing it) sends us to SSE. */
  private chooseFallback(name: TransportName, info: TransportClosed): void {
    if (name === 'sse') {
      // SSE cannot connect either: the server is down, not the WebSocket path; try both again.
      if (!info.welcomed) {
        this.useSse = this.WebSocket === undefined;
        this.wsStrikes = 0;
      }
      return;
    }
    const killed =
      !info.welcomed ||
      (this.goawayDelayMs === undefined &&
        Date.now() - this.welcomedAt < (this.options.killWindowMs ?? 10_000));
    this.wsStrikes = killed ? this.wsStrikes + 1 : 0;
    if (this.wsStrikes >= (this.options.fallbackAfter ?? 3)) this.useSse = true;
  }

  private scheduleReconnect(error: SluiceError | undefined): void {
    const backoff = { ...DEFAULT_BACKOFF, ...this.options.reconnect };
    const attempt = this.attempt;
    this.attempt += 1;
    // After a goaway the server said when to come back; jitter still spreads a drained crowd.
    const delayMs =
      this.goawayDelayMs !== undefined
        ? this.goawayDelayMs + backoffDelay(0, backoff) - backoff.minDelayMs
        : backoffDelay(attempt, backoff);
    this.goawayDelayMs = undefined;
    if (this.disconnectedAt === undefined) {
      this.disconnectedAt = Date.now();
      const ttlMs = (this.welcome?.limits.session_ttl_s ?? 120) * 1000;
      this.expiryTimer = setTimeout(() => this.handlers.expired(), ttlMs);
    }
    this.state = 'reconnecting';
    const next: TransportName = this.useSse ? 'sse' : 'websocket';
    this.emit({ state: 'reconnecting', transport: next, attempt: attempt + 1, delayMs, error });
    this.retryTimer = setTimeout(() => void this.open(next), delayMs);
  }

  private ack(): void {
    if (this.lastSeq > this.ackedSeq && this.send([{ type: 'ack', seq: this.lastSeq }]))
      this.ackedSeq = this.lastSeq;
  }

  private startAcks(): void {
    this.stopAcks();
    const interval = this.options.ackIntervalMs ?? 5_000;
    if (interval > 0) this.ackTimer = setInterval(() => this.ack(), interval);
  }

  private stopAcks(): void {
    if (this.ackTimer !== undefined) clearInterval(this.ackTimer);
    this.ackTimer = undefined;
  }

  private clearTimers(): void {
    clearTimeout(this.openTimer);
    clearTimeout(this.retryTimer);
    clearTimeout(this.expiryTimer);
    this.stopAcks();
  }

  private emit(
    change: Omit<StateChange, 'session' | 'transport'> & { transport?: TransportName | undefined },
  ): void {
    this.handlers.state({
      ...change,
      session: this.sessionId,
      transport: change.transport ?? this.transportName,
    });
  }
}

/** `http(s)://host[:port][/prefix]` from what the caller gave (a `ws(s)://` URL or `…/v1/ws` works too). */
export function baseUrl(url: string | undefined): string {
  const origin = (globalThis as { location?: { href: string } }).location?.href;
  if (url === undefined && origin === undefined) {
    throw new SluiceError('invalid_request', 'connect() needs a url outside a browser page');
  }
  const parsed = new URL(url ?? '/', origin);
  if (parsed.protocol === 'ws:') parsed.protocol = 'http:';
  if (parsed.protocol === 'wss:') parsed.protocol = 'https:';
  const path = parsed.pathname.replace(/\/v1\/ws\/?$/, '').replace(/\/+$/, '');
  return `${parsed.protocol}//${parsed.host}${path}`;
}

function globalFetch(): FetchLike {
  const fetch = (globalThis as { fetch?: FetchLike }).fetch;
  if (fetch === undefined) throw new SluiceError('connection_failed', 'no fetch available for SSE');
  // Called unbound, the browser's fetch throws "Illegal invocation".
  return (input, init) => fetch.call(globalThis, input, init);
}

function canStream(): boolean {
  return typeof (globalThis as { ReadableStream?: unknown }).ReadableStream === 'function';
}
