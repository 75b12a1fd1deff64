/**
 * The caller's side of one request: a `GenerateStream` (an async iterable of text pieces whose
 * `result` settles with the final `done`) and the promise behind `embed` / `classify`.
 *
 * Each turns the request's events into what the caller sees and settles exactly once. None of
 * them sends anything; `session.ts` owns the wire and tells them what arrived.
 */

import { SluiceError } from './errors.js';
import type {
  Classification,
  Done,
  Embedding,
  LabelScore,
  LoggedMessage,
  RequestMessage,
} from './messages.js';

/** The end of a generation: the server's `done` message, with the whole text. */
export type GenerateResult = Done & { readonly text: string };

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
 * The pieces of a streamed generation, in order. Iterate it once; `result` settles when the
 * request ends (with `finish_reason: 'cancelled'` after an abort). Breaking out of the loop early
 * cancels the request.
 */
export class GenerateStream implements AsyncIterable<string>, Pending {
  readonly id: string;
  readonly result: Promise<GenerateResult>;
  sent = false;
  seen = false;
  resent = false;

  private readonly pieces: string[] = [];
  private readonly parts: string[] = [];
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
      case 'done':
        this.ended = true;
        this.resolve({ ...message, text: this.text });
        this.notify();
        return true;
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
