/**
 * An incremental `text/event-stream` parser (WHATWG HTML §9.2.6) for the fetch-streaming SSE
 * transport: feed it the body's byte chunks as they arrive, get back whole events.
 *
 * Chunks may split anything: a multi-byte UTF-8 character (the decoder is streaming), a CRLF
 * pair, a line, an event. This module is pure: it never reads a stream or touches the network.
 */

export interface SseEvent {
  /** The `id:` in force for this event (the last one seen on the stream), `''` if none yet. */
  readonly id: string;
  /** The `event:` field, `'message'` when absent. */
  readonly event: string;
  readonly data: string;
}

const LINE_END = /\r\n|\r|\n/g;

export class SseParser {
  /** The last `retry:` value the server sent, in milliseconds. */
  retryMs: number | undefined;

  private readonly decoder = new TextDecoder('utf-8');
  private pending = '';
  private data: string[] = [];
  private event = '';
  private lastEventId = '';

  /** Feed one chunk of the body; returns the events it completed, in order. */
  feed(chunk: Uint8Array): SseEvent[] {
    this.pending += this.decoder.decode(chunk, { stream: true });
    return this.drain(false);
  }

  /** The body ended: flush the decoder. An event without its closing blank line is dropped. */
  end(): SseEvent[] {
    this.pending += this.decoder.decode();
    const events = this.drain(true);
    this.data = [];
    this.event = '';
    return events;
  }

  private drain(final: boolean): SseEvent[] {
    const events: SseEvent[] = [];
    const text = this.pending;
    let start = 0;
    LINE_END.lastIndex = 0;
    for (let match = LINE_END.exec(text); match !== null; match = LINE_END.exec(text)) {
      // A CR at the very end may be the first half of a CRLF split across chunks: wait for more.
      if (!final && match[0] === '\r' && match.index === text.length - 1) break;
      const event = this.line(text.slice(start, match.index));
      if (event !== undefined) events.push(event);
      start = LINE_END.lastIndex;
    }
    this.pending = text.slice(start);
    if (final && this.pending !== '') {
      this.line(this.pending);
      this.pending = '';
    }
    return events;
  }

  private line(line: string): SseEvent | undefined {
    if (line === '') return this.dispatch();
    if (line.startsWith(':')) return undefined;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    switch (field) {
      case 'data':
        this.data.push(value);
        break;
      case 'event':
        this.event = value;
        break;
      case 'id':
        if (!value.includes('\0')) this.lastEventId = value;
        break;
      case 'retry':
        if (/^\d+$/.test(value)) this.retryMs = Number(value);
        break;
      default:
        break;
    }
    return undefined;
  }

  private dispatch(): SseEvent | undefined {
    const data = this.data;
    const event = this.event;
    this.data = [];
    this.event = '';
    if (data.length === 0) return undefined;
    return { id: this.lastEventId, event: event === '' ? 'message' : event, data: data.join('\n') };
  }
}
