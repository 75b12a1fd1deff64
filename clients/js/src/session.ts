/**
 * `connect()` and `Session`: many requests on one session, told apart by client-assigned ids.
 *
 * The session keeps every request in flight until its terminal event, routes each event the
 * connection delivers to its request, queues what cannot be sent while reconnecting, and after a
 * resume sends again the requests the server may never have received. When the server answers
 * a resume with a new session, the requests it lost fail with a retryable `session_lost`.
 * It never talks to a socket itself (that is `connection.ts` and the transports).
 */

import {
  Connection,
  type ConnectionOptions,
  type ConnectionState,
  type StateChange,
  type WelcomeKind,
} from './connection.js';
import { fromWire, SluiceError } from './errors.js';
import type {
  ChatMessage,
  Classify,
  ClientMessage,
  Embed,
  Generate,
  GenerateOptions,
  LoggedMessage,
  OutputFormat,
  RequestMessage,
  Tool,
  ToolChoice,
  Welcome,
} from './messages.js';
import {
  Call,
  type ClassifyResult,
  classifyResult,
  type EmbedResult,
  embedResult,
  GenerateStream,
  type Pending,
} from './requests.js';
import type { TransportName } from './transport.js';

export type ConnectOptions = ConnectionOptions;

export interface GenerateParams {
  prompt?: string;
  messages?: ChatMessage[];
  system?: string;
  model?: string;
  options?: GenerateOptions;
  /** `'json'`, or a JSON Schema: the reply text is guaranteed to be one JSON value / an instance. */
  format?: OutputFormat;
  /** Tools the model may call, in OpenAI's shape: `{type: 'function', function: {name, description?, parameters?}}`. */
  tools?: Tool[];
  /** `'auto'` (the default), `'none'`, `'required'`, or `{type: 'function', function: {name}}`. */
  toolChoice?: ToolChoice;
  /** Keep the conversation in the session (PROTOCOL.md `history`). */
  history?: boolean;
  signal?: AbortSignal;
  /** A request id of your own (1–64 characters); one is made up otherwise. */
  id?: string;
}

export interface EmbedOptions {
  model?: string;
  /** Wire encoding; the result is a Float32Array per text either way. Default `base64`. */
  encoding?: 'float' | 'base64';
  normalize?: boolean;
  signal?: AbortSignal;
}

export interface ClassifyOptions {
  model?: string;
  multiLabel?: boolean;
  signal?: AbortSignal;
}

export interface SessionEvents {
  state: StateChange;
  welcome: Welcome;
  /** A refusal that names no request of ours (PROTOCOL.md: an `error` without `id`). */
  error: SluiceError;
}

type Listener<T> = (value: T) => void;

/** Open a session: resolves once the server's welcome arrived on some transport. */
export async function connect(options: ConnectOptions = {}): Promise<Session> {
  const session = new Session(options);
  await session.ready;
  return session;
}

export class Session {
  /** Settles with the first welcome (`connect()` awaits it). */
  readonly ready: Promise<Welcome>;
  private readonly connection: Connection;
  private readonly pending = new Map<string, Pending>();
  private readonly outbox: ClientMessage[] = [];
  private readonly listeners: { [K in keyof SessionEvents]: Set<Listener<SessionEvents[K]>> } = {
    state: new Set(),
    welcome: new Set(),
    error: new Set(),
  };
  private readonly idPrefix = Math.random().toString(36).slice(2, 8);
  private nextId = 0;
  private readonly cleanups = new Map<string, () => void>();
  /** Requests failed by an SSE POST's refusal, whose refusal event may still come on the stream. */
  private readonly refusedIds = new Set<string>();
  /** After a resume: requests that may not have reached the server, and the seq the replay ends at. */
  private resend: { until: number; requests: Pending[] } | undefined;

  constructor(options: ConnectOptions = {}) {
    this.connection = new Connection(options, {
      welcome: (welcome, kind) => this.onWelcome(welcome, kind),
      event: (message) => this.onEvent(message),
      state: (change) => this.emit('state', change),
      expired: () =>
        this.failSent(new SluiceError('connection_failed', 'disconnected longer than the session lives')),
      closed: (error) => this.failAll(error),
      accepted: (ids) => {
        for (const id of ids) {
          const request = this.pending.get(id);
          if (request !== undefined) request.seen = true;
        }
      },
      refused: (error, messages) => this.onRefused(error, messages),
    });
    this.ready = this.connection.start();
    this.ready.catch(() => {});
  }

  get sessionId(): string | undefined {
    return this.connection.sessionId;
  }

  get transport(): TransportName | undefined {
    return this.connection.transportName;
  }

  get state(): ConnectionState {
    return this.connection.state;
  }

  /** The seq of the newest event received: with `sessionId`, what resuming elsewhere needs. */
  get lastSeq(): number {
    return this.connection.lastSeq;
  }

  get welcome(): Welcome | undefined {
    return this.connection.welcome;
  }

  /** Requests in flight. */
  get inflight(): number {
    return this.pending.size;
  }

  /** Subscribe to an event; returns the unsubscribe function. */
  on<K extends keyof SessionEvents>(event: K, listener: Listener<SessionEvents[K]>): () => void {
    this.listeners[event].add(listener);
    return () => this.listeners[event].delete(listener);
  }

  /** Stream a generation: `for await (const piece of s.generate({prompt}))`, then `await stream.result`. */
  generate(params: GenerateParams): GenerateStream {
    if ((params.prompt === undefined) === (params.messages === undefined)) {
      throw new SluiceError('invalid_request', 'generate needs exactly one of prompt or messages');
    }
    const base = { type: 'generate' as const, id: params.id ?? this.newId() };
    const message: Generate =
      params.prompt !== undefined
        ? { ...base, prompt: params.prompt }
        : { ...base, messages: params.messages as [ChatMessage, ...ChatMessage[]] };
    if (params.system !== undefined) message.system = params.system;
    if (params.model !== undefined) message.model = params.model;
    if (params.options !== undefined) message.options = params.options;
    if (params.format !== undefined) message.format = params.format;
    checkTools(params.tools, params.toolChoice);
    if (params.tools !== undefined) message.tools = params.tools as [Tool, ...Tool[]];
    if (params.toolChoice !== undefined) message.tool_choice = params.toolChoice;
    if (params.history !== undefined) message.history = params.history;
    const stream = new GenerateStream(message, () => this.cancel(message.id));
    this.submit(stream, params.signal);
    return stream;
  }

  /** One vector per text. */
  embed(texts: string | string[], options: EmbedOptions = {}): Promise<EmbedResult> {
    const id = this.newId();
    const input = typeof texts === 'string' ? [texts] : texts;
    const message: Embed = {
      type: 'embed',
      id,
      input: input as [string, ...string[]],
      encoding: options.encoding ?? 'base64',
    };
    if (options.model !== undefined) message.model = options.model;
    if (options.normalize !== undefined) message.normalize = options.normalize;
    const call = new Call(message, embedResult);
    this.submit(call, options.signal);
    return call.promise;
  }

  /** Zero-shot scores per label, one list per text (a single text gives a list of one). */
  classify(
    texts: string | string[],
    labels: string[],
    options: ClassifyOptions = {},
  ): Promise<ClassifyResult> {
    const id = this.newId();
    const input = typeof texts === 'string' ? [texts] : texts;
    const message: Classify = {
      type: 'classify',
      id,
      input: input as [string, ...string[]],
      labels: labels as [string, string, ...string[]],
    };
    if (options.multiLabel !== undefined) message.multi_label = options.multiLabel;
    if (options.model !== undefined) message.model = options.model;
    const call = new Call(message, classifyResult);
    this.submit(call, options.signal);
    return call.promise;
  }

  /** Cancel a request by id. Idempotent, like the protocol's `cancel`. */
  cancel(id: string): void {
    const request = this.pending.get(id);
    if (request === undefined) return;
    if (!request.sent) {
      // The server never saw it: nothing to tell it, and no terminal event will come.
      this.pending.delete(id);
      request.fail(new SluiceError('cancelled', 'cancelled before it was sent', { requestId: id }));
      return;
    }
    this.deliver({ type: 'cancel', id });
  }

  /** Close the session: requests in flight fail with `closed`. */
  close(): void {
    this.connection.close();
  }

  private newId(): string {
    this.nextId += 1;
    return `${this.idPrefix}-${this.nextId.toString(36)}`;
  }

  private submit(request: Pending, signal: AbortSignal | undefined): void {
    const id = request.message.id;
    if (this.state === 'closed') {
      request.fail(new SluiceError('closed', 'the session is closed', { requestId: id }));
      return;
    }
    if (signal?.aborted) {
      request.fail(new SluiceError('cancelled', 'aborted before it was sent', { requestId: id }));
      return;
    }
    if (this.pending.has(id)) {
      request.fail(
        new SluiceError('duplicate_id', `request id ${id} is already in flight`, { requestId: id }),
      );
      return;
    }
    this.pending.set(id, request);
    if (signal !== undefined) {
      // A stream also stops yielding at once; other requests end with the server's answer.
      const onAbort = (): void => (request instanceof GenerateStream ? request.cancel() : this.cancel(id));
      signal.addEventListener('abort', onAbort, { once: true });
      this.cleanups.set(id, () => signal.removeEventListener('abort', onAbort));
    }
    if (this.connection.send([request.message])) request.sent = true;
  }

  private finish(id: string): void {
    this.pending.delete(id);
    this.cleanups.get(id)?.();
    this.cleanups.delete(id);
  }

  /** Send now, or keep for after the reconnect. */
  private deliver(message: ClientMessage): void {
    if (!this.connection.send([message])) this.outbox.push(message);
  }

  private onWelcome(welcome: Welcome, kind: WelcomeKind): void {
    if (kind === 'replaced') {
      this.failSent(
        new SluiceError(
          'session_lost',
          'the server could not resume the session; requests in flight were lost',
        ),
      );
    }
    this.emit('welcome', welcome);
    const unseen = [...this.pending.values()].filter((request) => request.sent && !request.seen);
    this.resend =
      kind === 'resumed' && unseen.length > 0 ? { until: welcome.last_seq, requests: unseen } : undefined;
    const unsent = [...this.pending.values()].filter((request) => !request.sent);
    const messages: ClientMessage[] = unsent.map((request) => request.message);
    // Cancels for requests that ended meanwhile are pointless; the rest go after their requests.
    for (const message of this.outbox.splice(0)) {
      if (message.type !== 'cancel' || this.pending.has(message.id)) messages.push(message);
    }
    if (this.connection.send(messages)) for (const request of unsent) request.sent = true;
    this.resendUnseen();
  }

  /**
   * Requests sent before the drop that have shown no sign of reaching the server may have been
   * lost with the connection. Once the replay is in, anything the server had finished would
   * have shown up, so sending these again is safe: one the server still runs is refused as
   * `duplicate_id` (ignored below) and never run twice.
   */
  private resendUnseen(): void {
    const resend = this.resend;
    if (resend === undefined || this.connection.lastSeq < resend.until) return;
    this.resend = undefined;
    const unseen = resend.requests.filter(
      (request) => !request.seen && this.pending.get(request.message.id) === request,
    );
    if (unseen.length === 0) return;
    if (this.connection.send(unseen.map((request) => request.message))) {
      for (const request of unseen) request.resent = true;
    }
  }

  private onEvent(message: LoggedMessage): void {
    switch (message.type) {
      case 'delta':
      case 'tool_call':
      case 'done':
      case 'embedding':
      case 'classification':
        this.route(message.id, message);
        break;
      case 'error':
        this.onError(message);
        break;
      case 'goaway':
        break;
      default:
        message satisfies never;
    }
    this.resendUnseen();
  }

  private route(id: string, message: LoggedMessage): void {
    const request = this.pending.get(id);
    if (request === undefined) return;
    request.seen = true;
    if (request.onEvent(message)) this.finish(id);
  }

  private onError(message: LoggedMessage & { type: 'error' }): void {
    if (typeof message.id === 'string') {
      this.route(message.id, message);
      return;
    }
    const ref = typeof message.ref === 'string' ? message.ref : undefined;
    const request = ref === undefined ? undefined : this.pending.get(ref);
    if (request !== undefined && ref !== undefined) {
      request.seen = true;
      // The server already runs this id (we sent it twice across a reconnect): not a failure.
      if (message.code === 'duplicate_id' && request.resent) return;
      this.finish(ref);
      request.fail(fromWire(message));
      return;
    }
    // Refused by the server's answer to the POST already (SSE logs the refusal as an event too).
    if (ref !== undefined && this.refusedIds.delete(ref)) return;
    this.emit('error', fromWire(message));
  }

  private onRefused(error: SluiceError, messages: readonly ClientMessage[]): void {
    const ids = messages
      .filter((m) => m.type === 'generate' || m.type === 'embed' || m.type === 'classify')
      .map((m) => (m as RequestMessage).id);
    const named = error.requestId !== undefined && ids.includes(error.requestId) ? [error.requestId] : ids;
    if (named.length === 0) {
      this.emit('error', error);
      return;
    }
    for (const id of named) {
      const request = this.pending.get(id);
      if (request === undefined || (error.code === 'duplicate_id' && request.resent)) continue;
      this.finish(id);
      request.fail(error);
      this.refusedIds.add(id);
      // Refusals that no event will repeat (a body that did not decode) must not pile up.
      if (this.refusedIds.size > 256) this.refusedIds.delete(this.refusedIds.values().next().value as string);
    }
  }

  /** Fail the requests the server had (or may have had); ones never sent wait for the next session. */
  private failSent(error: SluiceError): void {
    for (const [id, request] of [...this.pending]) {
      if (!request.sent) continue;
      this.finish(id);
      request.fail(withId(error, id));
    }
  }

  private failAll(error: SluiceError): void {
    for (const [id, request] of [...this.pending]) {
      this.finish(id);
      request.fail(withId(error, id));
    }
    this.outbox.length = 0;
  }

  private emit<K extends keyof SessionEvents>(event: K, value: SessionEvents[K]): void {
    for (const listener of this.listeners[event]) {
      try {
        listener(value);
      } catch {
        // A listener's bug must not break the session's bookkeeping.
      }
    }
  }
}

/** The mistakes the server would refuse anyway, refused before sending (PROTOCOL.md §1). */
function checkTools(tools: Tool[] | undefined, choice: ToolChoice | undefined): void {
  if (tools !== undefined) {
    if (!Array.isArray(tools) || tools.length === 0) {
      throw new SluiceError('invalid_request', 'tools must be a non-empty array of tools');
    }
    const names = new Set<string>();
    for (const tool of tools) {
      const name = tool?.function?.name;
      if (tool?.type !== 'function' || typeof name !== 'string') {
        throw new SluiceError(
          'invalid_request',
          "each tool must be {type: 'function', function: {name, ...}}",
        );
      }
      if (names.has(name)) throw new SluiceError('invalid_request', `tool ${name} is listed twice`);
      names.add(name);
    }
  }
  if (choice === undefined) return;
  if (tools === undefined) throw new SluiceError('invalid_request', 'toolChoice is only allowed with tools');
  if (typeof choice === 'object' && !tools.some((tool) => tool.function.name === choice.function?.name)) {
    throw new SluiceError(
      'invalid_request',
      `toolChoice names ${choice.function?.name}, which is not one of the tools`,
    );
  }
}

function withId(error: SluiceError, requestId: string): SluiceError {
  return new SluiceError(error.code, error.message, {
    retryable: error.retryable,
    retryAfterMs: error.retryAfterMs,
    requestId,
  });
}
