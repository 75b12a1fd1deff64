// The client in Node against the real server (started here, with the Ollama emulator behind it):
// concurrent requests on one session, abort, connections cut mid-stream that resume with the
// exact full text, tool calls and a schema-shaped reply. SSE tests skip, saying why, until the
// server offers the SSE endpoints.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import {
  type ChatMessage,
  type ConnectOptions,
  Session,
  SluiceError,
  type StreamItem,
  type Tool,
} from '../../src/index.js';
import { MODEL, type Stack, startStack, unavailable } from '../support/stack.js';

const why = unavailable();
let stack: Stack;

const opened = new Set<Session>();

/** A session on the real server, closed after the test even when the test fails. */
async function open(options: ConnectOptions = {}): Promise<Session> {
  const session = new Session({
    url: stack.url,
    WebSocket,
    reconnect: { minDelayMs: 50, maxDelayMs: 500 },
    ...options,
  });
  opened.add(session);
  await session.ready;
  return session;
}

afterEach(() => {
  for (const session of opened) session.close();
  opened.clear();
});

const WEATHER: Tool = {
  type: 'function',
  function: {
    name: 'get_weather',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
const CLOCK: Tool = {
  type: 'function',
  function: { name: 'clock', parameters: { type: 'object', properties: {} } },
};

const PROMPT = { messages: [{ role: 'user' as const, content: 'tell me about the river' }], model: MODEL };

/** The text the emulator produces for PROMPT, from a run nobody interrupts. */
async function reference(): Promise<string> {
  const s = await open({ transport: 'websocket' });
  try {
    const stream = s.generate(PROMPT);
    for await (const _ of stream);
    const result = await stream.result;
    assert.equal(result.finish_reason, 'stop');
    return result.text;
  } finally {
    s.close();
  }
}

describe('against the real server', { skip: why }, () => {
  before(async () => {
    stack = await startStack({ tokenRate: 40, tokens: 24 });
  });
  after(async () => {
    await stack?.stop();
  });

  test('welcome announces the emulator model, limits and a session', async () => {
    const s = await open();
    assert.equal(s.transport, 'websocket');
    assert.ok(s.sessionId);
    assert.ok(s.welcome?.models.generate.includes(MODEL), JSON.stringify(s.welcome?.models));
    assert.ok((s.welcome?.limits.max_inflight ?? 0) >= 1);
    s.close();
  });

  test('generate, embed and classify at once on one session', async () => {
    const s = await open();
    const stream = s.generate(PROMPT);
    const embedding = s.embed(['a river in the evening', 'water flows past stone']);
    const classes = s.classify(['I love this', 'this is awful'], ['positive', 'negative']);
    const pieces: string[] = [];
    for await (const piece of stream) pieces.push(piece);
    const [done, vectors, scores] = await Promise.all([stream.result, embedding, classes]);
    assert.ok(pieces.length > 1, 'streamed in pieces');
    assert.equal(pieces.join(''), done.text);
    assert.ok(done.usage.completion_tokens > 0);
    assert.ok(done.timings.total_ms >= 0);
    assert.equal(vectors.embeddings.length, 2);
    assert.ok(vectors.embeddings[0] instanceof Float32Array);
    assert.equal(vectors.embeddings[0]!.length, vectors.dimensions);
    const norm = Math.hypot(...vectors.embeddings[0]!);
    assert.ok(Math.abs(norm - 1) < 1e-3, `normalized (${norm})`);
    assert.equal(scores.results.length, 2);
    for (const list of scores.results) {
      assert.deepEqual(list.map((x) => x.label).sort(), ['negative', 'positive']);
      assert.ok(
        Math.abs(list.reduce((sum, x) => sum + x.score, 0) - 1) < 1e-3,
        'single-label scores sum to 1',
      );
    }
    assert.equal(s.inflight, 0);
    s.close();
  });

  test('aborting a stream cancels it on the server: done with finish_reason cancelled', async () => {
    const s = await open();
    const controller = new AbortController();
    const stream = s.generate({ ...PROMPT, signal: controller.signal });
    let count = 0;
    for await (const _ of stream) {
      count += 1;
      if (count === 2) controller.abort();
    }
    const done = await stream.result;
    assert.equal(done.finish_reason, 'cancelled');
    assert.equal(count, 2);
    s.close();
  });

  test('errors come back typed: unknown model', async () => {
    const s = await open();
    const stream = s.generate({ prompt: 'hi', model: 'no-such-model:1b' });
    await assert.rejects(
      async () => {
        for await (const _ of stream);
      },
      (error: SluiceError) =>
        error instanceof SluiceError && error.code === 'model_not_found' && !error.retryable,
    );
    s.close();
  });

  test('a WebSocket cut mid-stream resumes with the exact full text', async () => {
    const expected = await reference();
    const s = await open({ url: stack.proxyUrl, transport: 'websocket' });
    const states: string[] = [];
    s.on('state', (change) => states.push(change.state));
    const stream = s.generate(PROMPT);
    let cuts = 0;
    let received = '';
    for await (const piece of stream) {
      received += piece;
      // Cut twice, early and later, while tokens are still coming.
      if ((received.length > 10 && cuts === 0) || (received.length > 60 && cuts === 1)) {
        cuts += stack.proxy.cut() > 0 ? 1 : 0;
      }
    }
    assert.equal(cuts, 2, 'the connection was cut twice mid-stream');
    assert.equal(received, expected);
    assert.equal((await stream.result).text, expected);
    assert.ok(states.filter((x) => x === 'reconnecting').length >= 2, states.join());
    assert.equal(s.transport, 'websocket');
    s.close();
  });

  test('tools: a call with arguments from its parameters, then the tool result round trip', async () => {
    const s = await open();
    const turns: ChatMessage[] = [{ role: 'user', content: 'what is the weather?' }];
    const stream = s.generate({ messages: turns, model: MODEL, tools: [WEATHER, CLOCK] });
    const items: StreamItem[] = [];
    for await (const item of stream.events()) items.push(item);
    const first = await stream.result;
    assert.equal(first.finish_reason, 'tool_calls');
    assert.deepEqual(
      first.tool_calls.map((call) => [call.index, call.name]),
      [[0, 'get_weather']],
    );
    const call = first.tool_calls[0]!;
    // The emulator fills the parameters' schema: a string property gets "sluice".
    assert.deepEqual(call.parsed, { city: 'sluice' });
    assert.ok(call.call_id.length > 0);
    assert.equal(items[items.length - 1], call, 'the call came after the text');
    assert.equal(items.filter((item) => typeof item === 'string').join(''), first.text);
    turns.push(first.message, call.reply(JSON.stringify({ sky: 'clear' })));
    const second = await s.generate({ messages: turns, model: MODEL, tools: [WEATHER, CLOCK] }).result;
    assert.equal(second.finish_reason, 'stop');
    assert.deepEqual(second.tool_calls, []);
    assert.ok(second.text.length > 0);
    s.close();
  });

  test('format: a JSON Schema reply is an instance of the schema', async () => {
    const s = await open();
    const schema = {
      type: 'object',
      properties: { name: { type: 'string' }, ok: { type: 'boolean' }, n: { type: 'integer', minimum: 3 } },
      required: ['name', 'ok', 'n'],
    };
    const result = await s.generate({ prompt: 'shape it', model: MODEL, format: schema }).result;
    assert.equal(result.finish_reason, 'stop');
    assert.deepEqual(JSON.parse(result.text), { name: 'sluice', ok: true, n: 3 });
    s.close();
  });

  describe('SSE', () => {
    test('a forced tool call over SSE', async (t) => {
      if (!stack.sse) return t.skip('the server has no SSE endpoints (POST /v1/sessions) yet');
      const s = await open({ transport: 'sse' });
      const result = await s.generate({
        prompt: 'time?',
        model: MODEL,
        tools: [WEATHER, CLOCK],
        toolChoice: { type: 'function', function: { name: 'clock' } },
      }).result;
      assert.equal(result.finish_reason, 'tool_calls');
      assert.deepEqual(
        result.tool_calls.map((call) => [call.name, call.parsed]),
        [['clock', {}]],
      );
      s.close();
    });

    test('generate over SSE gives the same text as over WebSocket', async (t) => {
      if (!stack.sse) return t.skip('the server has no SSE endpoints (POST /v1/sessions) yet');
      const expected = await reference();
      const s = await open({ transport: 'sse' });
      assert.equal(s.transport, 'sse');
      const stream = s.generate(PROMPT);
      let text = '';
      for await (const piece of stream) text += piece;
      assert.equal(text, expected);
      const vectors = await s.embed('over sse');
      assert.equal(vectors.embeddings.length, 1);
      s.close();
    });

    test('an SSE stream cut mid-stream resumes with the exact full text', async (t) => {
      if (!stack.sse) return t.skip('the server has no SSE endpoints (POST /v1/sessions) yet');
      const expected = await reference();
      const s = await open({ url: stack.proxyUrl, transport: 'sse' });
      const stream = s.generate(PROMPT);
      let text = '';
      let cut = false;
      for await (const piece of stream) {
        text += piece;
        if (!cut && text.length > 10) cut = stack.proxy.cut() > 0;
      }
      assert.ok(cut);
      assert.equal(text, expected);
      s.close();
    });

    test('auto falls back to SSE when a proxy refuses WebSocket upgrades', async (t) => {
      if (!stack.sse) return t.skip('the server has no SSE endpoints (POST /v1/sessions) yet');
      stack.proxy.refuseWebSocket = true;
      try {
        const s = await open({ url: stack.proxyUrl });
        assert.equal(s.transport, 'sse');
        const stream = s.generate(PROMPT);
        for await (const _ of stream);
        assert.equal((await stream.result).finish_reason, 'stop');
        s.close();
      } finally {
        stack.proxy.refuseWebSocket = false;
      }
    });
  });
});

if (why !== undefined) {
  test('integration tests need the real server', (t) => t.skip(why));
}
