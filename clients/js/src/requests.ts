/**
 * The caller's side of one request: a `GenerateStream` (an async iterable of text pieces whose
 * `result` settles with the final `done`; `events()` also yields its `ToolCall`s) and the promise
 * behind `embed` / `classify`.
 *
 * Each turns the request's events into what the caller sees and settles exactly once. None of
 * them sends anything; `session.ts` owns the wire and tells them what arrived.
 */

import { SluiceError } from './errors.js';
import type {
  ChatMessage,
  Classification,
  Done,
  Embedding,
  LabelScore,
  LoggedMessage,
  MessageToolCall,
  RequestMessage,
  ToolCallEvent,
} from './messages.js';

/** One call the model made to a tool of the request (a `tool_call` event). */
export class ToolCall {
  /** From 0 within the request. */
  readonly index: number;
  /** Made by the server; what the `tool` message answering this call names. */
  readonly call_id: string;
  readonly name: string;
  /** The JSON text of an object, as the server sent it. */
  readonly arguments: string;

  constructor(event: Pick<ToolCallEvent, 'index' | 'call_id' | 'name' | 'arguments'>) {
    this.index = event.index;
    this.call_id = event.call_id;
    this.name = event.name;
    this.arguments = event.arguments;
  }

  /** `arguments`, parsed. Throws a `SluiceError` when they are not a JSON object. */
  get parsed(): Record<string, unknown> {
    let value: unknown;
    try {
      value = JSON.parse(this.arguments);
    } catch {
      value = undefined;
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      throw new SluiceError('internal', `the arguments of tool call ${this.call_id} are not a JSON object`);
    }
    return value as Record<string, unknown>;
  }

  /** The `tool` message answering this call, for a later request's `messages`. */
  reply(content: string): ChatMessage {
    return { role: 'tool', content, tool_call_id: this.call_id };
  }

  /** This call as an assistant message carries it. */
  toMessageCall(): MessageToolCall {
    return { id: this.call_id, type: 'function', function: { name: this.name, arguments: this.arguments } };
  }
}

/** The end of a generation: the server's `done` message, with the whole text and the tool calls. */
export type GenerateResult = Done & {
  readonly text: string;
  /** In `index` order; `finish_reason` is `'tool_calls'` when there are any. */
  readonly tool_calls: ToolCall[];
  /** This reply as the assistant turn of a later request's `messages`, its calls included. */
  readonly message: ChatMessage;
};

/** What `GenerateStream.events()` yields: a piece of text, or a whole tool call. */
export type StreamItem = string | ToolCall;

export interface EmbedResult {
  readonly model: string;
  readonly dimensions: number;
  /** One vector per input text, in input order. */
  readonly embeddings: Float32Array[];
}

export interface ClassifyResult {
  readonly model: string;
  /** One list per input text, sorted by score, highest first. */
  readonly results: LabelScore[][];
}

/** What `session.ts` holds for a request in flight. */
export interface Pending {
  readonly message: RequestMessage;
  /** Handed to a transport at least once. */
  sent: boolean;
  /** The server has it: an event for it arrived, or SSE's POST accepted it. */
  seen: boolean;
  /** Sent again after a resume; a `duplicate_id` refusal for it only means the server had it. */
  resent: boolean;
  /** One of the request's events; true when it was the terminal one. */
  onEvent(message: LoggedMessage): boolean;
  fail(error: SluiceError): void;
}

/**
 * The pieces of a streamed generation, in order. Iterate it once (the stream itself for text
 * only, or `events()` for text and tool calls); `result` settles when the request ends (with
 * `finish_reason: 'cancelled'` after an abort). Breaking out of the loop early cancels the request.
 */
export class GenerateStream implements AsyncIterable<string>, Pending {
  readonly id: string;
  readonly result: Promise<GenerateResult>;
  sent = false;
  seen = false;
  resent = false;

  private readonly pieces: StreamItem[] = [];
  private readonly parts: string[] = [];
  private readonly calls: ToolCall[] = [];
  private wake: (() => void) | undefined;
  private ended = false;
  private stopped = false;
  private error: SluiceError | undefined;
  private resolve!: (result: GenerateResult) => void;
  private reject!: (error: SluiceError) => void;

  constructor(
    readonly message: RequestMessage,
    private readonly cancelRequest: () => void,
  ) {
    this.id = message.id;
    this.result = new Promise<GenerateResult>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // The loop already throws the error; an unread `result` must not also crash the process.
    this.result.catch(() => {});
  }

  /** The text received so far. */
  get text(): string {
    return this.parts.join('');
  }

  /** The tool calls received so far. */
  get toolCalls(): readonly ToolCall[] {
    return this.calls;
  }

  /** Ask the server to stop; iteration ends now, `result` settles when the server confirms. */
  cancel(): void {
    if (this.ended) return;
    this.stopped = true;
    this.cancelRequest();
    this.notify();
  }

  onEvent(message: LoggedMessage): boolean {
    switch (message.type) {
      case 'delta':
        this.parts.push(message.text);
        if (!this.stopped) this.pieces.push(message.text);
        this.seen = true;
        this.notify();
        return false;
      case 'tool_call': {
        const call = new ToolCall(message);
        this.calls.push(call);
        if (!this.stopped) this.pieces.push(call);
        this.seen = true;
        this.notify();
        return false;
      }
      case 'done': {
        this.ended = true;
        const text = this.text;
        const tool_calls = [...this.calls];
        const reply: ChatMessage = { role: 'assistant', content: text };
        if (tool_calls.length > 0) reply.tool_calls = tool_calls.map((call) => call.toMessageCall());
        this.resolve({ ...message, text, tool_calls, message: reply });
        this.notify();
        return true;
      }
      case 'error':
        this.fail(
          new SluiceError(message.code, message.message, {
            retryable: message.retryable,
            retryAfterMs: message.retry_after_ms ?? undefined,
            requestId: this.id,
          }),
        );
        return true;
      default:
        return false;
    }
  }

  fail(error: SluiceError): void {
    if (this.ended) return;
    this.ended = true;
    // Only the caller cancels a generation before the server saw it: end the loop quietly.
    if (error.code === 'cancelled') this.stopped = true;
    this.error = error;
    this.reject(error);
    this.notify();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<string> {
    for await (const item of this.events()) if (typeof item === 'string') yield item;
  }

  /** Text pieces and `ToolCall`s in the order they came (iterate this or the stream, once). */
  async *events(): AsyncGenerator<StreamItem, void, undefined> {
    let finished = false;
    try {
      for (;;) {
        const piece = this.pieces.shift();
        if (piece !== undefined) {
          yield piece;
          continue;
        }
        if (this.error !== undefined && !this.stopped) throw this.error;
        if (this.ended || this.stopped) break;
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
      }
      finished = true;
    } finally {
      // Leaving the loop early (break, return, a throw in the loop body) cancels the request.
      if (!finished) this.cancel();
    }
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}

/** A request answered by one terminal message: `embed` or `classify`. */
export class Call<T> implements Pending {
  readonly promise: Promise<T>;
  sent = false;
  seen = false;
  resent = false;
  private resolve!: (value: T) => void;
  private reject!: (error: SluiceError) => void;

  constructor(
    readonly message: RequestMessage,
    private readonly settle: (message: LoggedMessage) => T | undefined,
  ) {
    this.promise = new Promise<T>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
  }

  onEvent(message: LoggedMessage): boolean {
    if (message.type === 'error') {
      this.reject(
        new SluiceError(message.code, message.message, {
          retryable: message.retryable,
          retryAfterMs: message.retry_after_ms ?? undefined,
          requestId: this.message.id,
        }),
      );
      return true;
    }
    const value = this.settle(message);
    if (value === undefined) return false;
    this.resolve(value);
    return true;
  }

  fail(error: SluiceError): void {
    this.reject(error);
  }
}

export function embedResult(message: LoggedMessage): EmbedResult | undefined {
  if (message.type !== 'embedding') return undefined;
  return {
    model: message.model,
    dimensions: message.dimensions,
    embeddings: (message as Embedding).embeddings.map((vector) =>
      typeof vector === 'string' ? decodeFloat32(vector) : Float32Array.from(vector),
    ),
  };
}

export function classifyResult(message: LoggedMessage): ClassifyResult | undefined {
  if (message.type !== 'classification') return undefined;
  return { model: message.model, results: (message as Classification).results };
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** base64 of little-endian float32 bytes (PROTOCOL.md `encoding: "base64"`) → a Float32Array. */
export function decodeFloat32(base64: string): Float32Array {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  if (bytes.length % 4 !== 0)
    throw new SluiceError('internal', 'an embedding is not a whole number of float32');
  if (LITTLE_ENDIAN) return new Float32Array(bytes.buffer);
  const view = new DataView(bytes.buffer);
  return Float32Array.from({ length: bytes.length / 4 }, (_, i) => view.getFloat32(i * 4, true));
}
