// The fetch-streaming SSE parser, fed the same bytes cut at every possible place: a multi-byte
// UTF-8 character or a CRLF split across chunks must never change what comes out.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type SseEvent, SseParser } from '../../src/sse_parser.js';

const encoder = new TextEncoder();

function parseChunks(chunks: Uint8Array[]): SseEvent[] {
  const parser = new SseParser();
  const events = chunks.flatMap((chunk) => parser.feed(chunk));
  return [...events, ...parser.end()];
}

function splitAt(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  const points = [0, ...cuts, bytes.length];
  return points.slice(1).map((end, i) => bytes.slice(points[i], end));
}

const STREAM =
  ': keep-alive\n\n' +
  'id: 1\nevent: delta\ndata: {"type":"delta","id":"a","seq":1,"text":"h\u00e9llo \u{1F600} \u4e16\u754c"}\n\n' +
  'id: 2\r\nevent: done\r\ndata: {"type":"done","seq":2}\r\n\r\n' +
  'id: 3\revent: delta\rdata: line one\rdata: line two\r\r';

const EXPECTED: SseEvent[] = [
  {
    id: '1',
    event: 'delta',
    data: '{"type":"delta","id":"a","seq":1,"text":"h\u00e9llo \u{1F600} \u4e16\u754c"}',
  },
  { id: '2', event: 'done', data: '{"type":"done","seq":2}' },
  { id: '3', event: 'delta', data: 'line one\nline two' },
];

test('one chunk', () => {
  assert.deepEqual(parseChunks([encoder.encode(STREAM)]), EXPECTED);
});

test('a chunk boundary at every byte, including inside 2-, 3- and 4-byte characters and CRLF', () => {
  const bytes = encoder.encode(STREAM);
  for (let cut = 1; cut < bytes.length; cut += 1) {
    assert.deepEqual(parseChunks(splitAt(bytes, [cut])), EXPECTED, `cut at byte ${cut}`);
  }
});

test('one byte per chunk', () => {
  const bytes = encoder.encode(STREAM);
  assert.deepEqual(
    parseChunks(
      splitAt(
        bytes,
        Array.from({ length: bytes.length - 1 }, (_, i) => i + 1),
      ),
    ),
    EXPECTED,
  );
});

test('the emoji split byte by byte arrives whole, never as replacement characters', () => {
  const bytes = encoder.encode('data: \u{1F600}\n\n');
  const emojiStart = 6;
  const events = parseChunks(splitAt(bytes, [emojiStart + 1, emojiStart + 2, emojiStart + 3]));
  assert.equal(events.length, 1);
  assert.equal(events[0]!.data, '\u{1F600}');
  assert.ok(!events[0]!.data.includes('\uFFFD'));
});

test('fields per the WHATWG rules: no space after colon, unknown fields, empty data, retry, BOM', () => {
  const parser = new SseParser();
  const events = parser.feed(
    encoder.encode('\uFEFFdata:no-space\nfoo: bar\n\nevent: ping\n\ndata\n\nretry: 2500\nid: 7\ndata: x\n\n'),
  );
  assert.deepEqual(events, [
    { id: '', event: 'message', data: 'no-space' },
    { id: '', event: 'message', data: '' },
    { id: '7', event: 'message', data: 'x' },
  ]);
  assert.equal(parser.retryMs, 2500);
});

test('the id persists across events until changed; an id with NUL is ignored', () => {
  const events = parseChunks([encoder.encode('id: 4\ndata: a\n\ndata: b\n\nid: 5\u0000\ndata: c\n\n')]);
  assert.deepEqual(
    events.map((e) => e.id),
    ['4', '4', '4'],
  );
});

test('an event cut off by the end of the stream is dropped', () => {
  const events = parseChunks([encoder.encode('data: whole\n\ndata: partial')]);
  assert.deepEqual(
    events.map((e) => e.data),
    ['whole'],
  );
});
