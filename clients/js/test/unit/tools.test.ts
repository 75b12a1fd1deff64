// Tools and structured output: the generate request on the wire, tool_call events on the stream
// and the result, a tool-result round trip, a resume in the middle of the calls, bad arguments.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SluiceError } from '../../src/errors.js';
import type { ChatMessage, Generate, Tool } from '../../src/messages.js';
import { type StreamItem, ToolCall } from '../../src/requests.js';
import { collect, open } from '../support/client.js';
import { FakeServer, until } from '../support/fake_server.js';

const WEATHER: Tool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
const CLOCK: Tool = { type: 'function', function: { name: 'clock' } };

function sentGenerates(server: FakeServer): Generate[] {
  return server.received.filter((m): m is Generate => m.type === 'generate');
}

test('tools, toolChoice and a schema format go on the wire as the protocol names them', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => session.done(request.id);
  const s = await open(server);
  const schema = { type: 'object', properties: { n: { type: 'integer' } }, required: ['n'] };
  await s.generate({
    prompt: 'p',
    tools: [WEATHER, CLOCK],
    toolChoice: { type: 'function', function: { name: 'clock' } },
    format: schema,
  }).result;
  await s.generate({ prompt: 'q', format: 'json', tools: [CLOCK], toolChoice: 'none' }).result;
  const [first, second] = sentGenerates(server);
  assert.deepEqual(first, {
    type: 'generate',
    id: first!.id,
    prompt: 'p',
    format: schema,
    tools: [WEATHER, CLOCK],
    tool_choice: { type: 'function', function: { name: 'clock' } },
  });
  assert.equal(second!.format, 'json');
  assert.equal(second!.tool_choice, 'none');
  s.close();
});

test('tool_call events reach events() in order, stream.toolCalls and the result', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    session.delta(request.id, 'Let me ');
    session.delta(request.id, 'check.');
    session.toolCall(request.id, 0, 'get_weather', { city: 'Oslo' });
    session.toolCall(request.id, 1, 'clock', {});
    session.done(request.id, 'tool_calls');
  };
  const s = await open(server);
  const stream = s.generate({ prompt: 'weather?', tools: [WEATHER, CLOCK] });
  const items: StreamItem[] = [];
  for await (const item of stream.events()) items.push(item);
  assert.deepEqual(items.slice(0, 2), ['Let me ', 'check.']);
  const calls = items.slice(2) as ToolCall[];
  assert.ok(calls.every((call) => call instanceof ToolCall));
  assert.deepEqual(
    calls.map((c) => [c.index, c.call_id, c.name, c.arguments]),
    [
      [0, `call-${stream.id}-0`, 'get_weather', '{"city":"Oslo"}'],
      [1, `call-${stream.id}-1`, 'clock', '{}'],
    ],
  );
  assert.deepEqual(calls[0]!.parsed, { city: 'Oslo' });
  assert.deepEqual(stream.toolCalls, calls);
  const result = await stream.result;
  assert.equal(result.finish_reason, 'tool_calls');
  assert.equal(result.text, 'Let me check.');
  assert.deepEqual(result.tool_calls, calls);
  assert.deepEqual(result.message, {
    role: 'assistant',
    content: 'Let me check.',
    tool_calls: [
      {
        id: `call-${stream.id}-0`,
        type: 'function',
        function: { name: 'get_weather', arguments: '{"city":"Oslo"}' },
      },
      { id: `call-${stream.id}-1`, type: 'function', function: { name: 'clock', arguments: '{}' } },
    ],
  });
  s.close();
});

test('iterating the stream itself yields text only; the calls are still on the result', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    session.toolCall(request.id, 0, 'clock', {});
    session.delta(request.id, 'done');
    session.done(request.id, 'tool_calls');
  };
  const s = await open(server);
  const stream = s.generate({ prompt: 'time?', tools: [CLOCK], toolChoice: 'required' });
  assert.deepEqual(await collect(stream), ['done']);
  const result = await stream.result;
  assert.deepEqual(
    result.tool_calls.map((c) => c.name),
    ['clock'],
  );
  assert.equal(s.inflight, 0, 'a tool_call is not terminal; the done is');
  s.close();
});

test('a tool-result round trip sends the assistant calls and the tool message back', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    if (request.type !== 'generate') return;
    const last = request.messages?.[request.messages.length - 1];
    if (last?.role === 'tool') {
      session.delta(request.id, `It is ${JSON.parse(last.content).sky}.`);
      session.done(request.id);
    } else {
      session.toolCall(request.id, 0, 'get_weather', { city: 'Oslo' }, 'call-xyz');
      session.done(request.id, 'tool_calls');
    }
  };
  const s = await open(server);
  const turns: ChatMessage[] = [{ role: 'user', content: 'weather in Oslo?' }];
  const first = await s.generate({ messages: turns, tools: [WEATHER] }).result;
  assert.equal(first.finish_reason, 'tool_calls');
  const call = first.tool_calls[0]!;
  turns.push(first.message, call.reply(JSON.stringify({ city: call.parsed.city, sky: 'clear' })));
  const second = await s.generate({ messages: turns, tools: [WEATHER] }).result;
  assert.equal(second.text, 'It is clear.');
  assert.deepEqual(second.tool_calls, []);
  assert.equal(second.message.tool_calls, undefined);
  const sent = sentGenerates(server)[1]!.messages!;
  assert.deepEqual(sent[1], {
    role: 'assistant',
    content: '',
    tool_calls: [
      { id: 'call-xyz', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Oslo"}' } },
    ],
  });
  assert.deepEqual(sent[2], {
    role: 'tool',
    content: '{"city":"Oslo","sky":"clear"}',
    tool_call_id: 'call-xyz',
  });
  s.close();
});

test('a drop between tool calls resumes: every call exactly once, in order', async () => {
  const server = new FakeServer({ replayOverlap: 2 });
  server.onRequest = (session, request) => {
    session.delta(request.id, 'a');
    session.toolCall(request.id, 0, 'get_weather', { city: 'Oslo' });
  };
  const s = await open(server);
  const stream = s.generate({ prompt: 'p', tools: [WEATHER, CLOCK] });
  const items: StreamItem[] = [];
  for await (const item of stream.events()) {
    items.push(item);
    if (items.length === 2) {
      server.session.drop();
      server.session.toolCall(stream.id, 1, 'clock', {});
      await until(() => server.sockets.length === 2 && server.session.live !== undefined, 2000, 'reconnect');
      server.session.done(stream.id, 'tool_calls');
    }
  }
  assert.deepEqual(
    items.map((item) => (typeof item === 'string' ? item : item.name)),
    ['a', 'get_weather', 'clock'],
  );
  const result = await stream.result;
  assert.deepEqual(
    result.tool_calls.map((c) => c.index),
    [0, 1],
  );
  assert.equal(sentGenerates(server).length, 1, 'not sent again: the server had it');
  s.close();
});

test('bad tools or toolChoice are refused before sending', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const cases: [Parameters<typeof s.generate>[0], RegExp][] = [
    [{ prompt: 'p', tools: [] }, /non-empty/],
    [{ prompt: 'p', toolChoice: 'required' }, /only allowed with tools/],
    [{ prompt: 'p', tools: [CLOCK, CLOCK] }, /clock is listed twice/],
    [{ prompt: 'p', tools: [WEATHER], toolChoice: { type: 'function', function: { name: 'nope' } } }, /nope/],
    [{ prompt: 'p', tools: [{ name: 'bare' } as unknown as Tool] }, /type: 'function'/],
  ];
  for (const [params, message] of cases) {
    assert.throws(
      () => s.generate(params),
      (error: SluiceError) =>
        error instanceof SluiceError && error.code === 'invalid_request' && message.test(error.message),
    );
  }
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(sentGenerates(server).length, 0);
  s.close();
});

test('ToolCall.parsed refuses arguments that are not a JSON object', () => {
  const call = new ToolCall({ index: 0, call_id: 'c', name: 'f', arguments: '[1]' });
  assert.throws(() => call.parsed, { code: 'internal' });
  assert.deepEqual(call.reply('42'), { role: 'tool', content: '42', tool_call_id: 'c' });
});
