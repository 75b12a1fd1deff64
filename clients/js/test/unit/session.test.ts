// Requests on one session against the fake server: id routing, abort → cancel, error mapping.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SluiceError } from '../../src/errors.js';
import type { RequestMessage } from '../../src/messages.js';
import { collect, float32Base64, open } from '../support/client.js';
import { FakeServer, until } from '../support/fake_server.js';

test('connect says hello over WebSocket and exposes the session', async () => {
  const server = new FakeServer();
  const states: string[] = [];
  const s = await open(server, { client: 'unit-test' });
  s.on('state', (change) => states.push(change.state));
  assert.equal(s.transport, 'websocket');
  assert.equal(s.sessionId, 's1');
  assert.equal(s.state, 'connected');
  assert.equal(s.welcome?.models.generate[0], 'fake-model');
  assert.equal(server.sockets[0]!.url, 'ws://fake.test/v1/ws');
  assert.equal(server.sockets[0]!.protocols, 'sluice.v1');
  assert.deepEqual(server.hellos[0]!.hello, { type: 'hello', protocol: 1, client: 'unit-test' });
  s.close();
  assert.equal(s.state, 'closed');
  assert.deepEqual(states, ['closed']);
});

test('interleaved events of concurrent requests reach their own request', async () => {
  const server = new FakeServer();
  const requests: RequestMessage[] = [];
  server.onRequest = (_session, request) => requests.push(request);
  const s = await open(server);
  const a = s.generate({ prompt: 'first' });
  const b = s.generate({
    messages: [{ role: 'user', content: 'second' }],
    model: 'fake-model',
    options: { max_tokens: 4 },
  });
  const embedding = s.embed(['x', 'y']);
  const classes = s.classify('great movie', ['positive', 'negative']);
  await until(() => requests.length === 4, 2000, 'four requests');
  assert.equal(new Set(requests.map((r) => r.id)).size, 4, 'ids are unique');
  assert.deepEqual(
    requests.map((r) => r.type),
    ['generate', 'generate', 'embed', 'classify'],
  );
  const [ga, gb, em, cl] = requests as [RequestMessage, RequestMessage, RequestMessage, RequestMessage];
  assert.equal(ga.id, a.id);
  assert.deepEqual(gb.type === 'generate' && gb.options, { max_tokens: 4 });
  const session = server.session;
  session.delta(ga.id, 'He');
  session.delta(gb.id, 'Wo');
  session.emit({
    type: 'classification',
    id: cl.id,
    model: 'fake-classify',
    results: [
      [
        { label: 'positive', score: 0.9 },
        { label: 'negative', score: 0.1 },
      ],
    ],
  });
  session.delta(ga.id, 'llo');
  session.emit({
    type: 'embedding',
    id: em.id,
    model: 'fake-embed',
    dimensions: 3,
    embeddings: [float32Base64([1, 0.5, -2]), float32Base64([0, 0, 1])],
  });
  session.delta(gb.id, 'rld');
  session.done(gb.id, 'length');
  session.done(ga.id);
  const [piecesA, piecesB] = await Promise.all([collect(a), collect(b)]);
  assert.deepEqual(piecesA, ['He', 'llo']);
  assert.deepEqual(piecesB, ['Wo', 'rld']);
  const resultA = await a.result;
  assert.equal(resultA.text, 'Hello');
  assert.equal(resultA.finish_reason, 'stop');
  assert.deepEqual(resultA.usage, { prompt_tokens: 3, completion_tokens: 5 });
  assert.equal((await b.result).finish_reason, 'length');
  const vectors = await embedding;
  assert.equal(em.type === 'embed' && em.encoding, 'base64');
  assert.ok(vectors.embeddings[0] instanceof Float32Array);
  assert.deepEqual([...vectors.embeddings[0]!], [1, 0.5, -2]);
  assert.deepEqual([...vectors.embeddings[1]!], [0, 0, 1]);
  assert.equal((await classes).results[0]![0]!.label, 'positive');
  assert.equal(s.inflight, 0);
  s.close();
});

test('float-encoded embeddings also come back as Float32Array', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) =>
    session.emit({ type: 'embedding', id: request.id, model: 'm', dimensions: 2, embeddings: [[0.25, -1]] });
  const s = await open(server);
  const result = await s.embed('one', { encoding: 'float', model: 'm', normalize: false });
  assert.deepEqual([...result.embeddings[0]!], [0.25, -1]);
  const sent = server.received.find((m) => m.type === 'embed');
  assert.ok(sent?.type === 'embed');
  assert.deepEqual(sent, {
    type: 'embed',
    id: sent.id,
    input: ['one'],
    encoding: 'float',
    model: 'm',
    normalize: false,
  });
  s.close();
});

test('aborting a stream sends cancel for its id, stops yielding, and ends with finish_reason cancelled', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => session.delta(request.id, 'one ');
  const s = await open(server);
  const controller = new AbortController();
  const stream = s.generate({ prompt: 'long story', signal: controller.signal });
  const pieces: string[] = [];
  for await (const piece of stream) {
    pieces.push(piece);
    controller.abort();
    server.session.delta(stream.id, 'never seen');
  }
  assert.deepEqual(pieces, ['one ']);
  const result = await stream.result;
  assert.equal(result.finish_reason, 'cancelled');
  const cancels = server.received.filter((m) => m.type === 'cancel');
  assert.deepEqual(cancels, [{ type: 'cancel', id: stream.id }]);
  s.close();
});

test('breaking out of the loop cancels the request', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    session.delta(request.id, 'a');
    session.delta(request.id, 'b');
  };
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  for await (const piece of stream) {
    assert.equal(piece, 'a');
    break;
  }
  await until(() => server.received.some((m) => m.type === 'cancel'), 2000, 'cancel');
  assert.equal((await stream.result).finish_reason, 'cancelled');
  s.close();
});

test('an already-aborted signal sends nothing and rejects with cancelled', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const stream = s.generate({ prompt: 'p', signal: AbortSignal.abort() });
  assert.deepEqual(await collect(stream), []);
  await assert.rejects(stream.result, (e: SluiceError) => e.code === 'cancelled' && !e.retryable);
  await assert.rejects(s.embed('x', { signal: AbortSignal.abort() }), { code: 'cancelled' });
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(server.received.length, 0);
  s.close();
});

test("aborting an embed ends it with the server's cancelled error", async () => {
  const server = new FakeServer();
  const s = await open(server);
  const controller = new AbortController();
  const pending = s.classify(['a', 'b'], ['x', 'y'], { multiLabel: true, signal: controller.signal });
  await until(() => server.received.length === 1, 2000, 'classify');
  assert.equal(server.received[0]!.type === 'classify' && server.received[0]!.multi_label, true);
  controller.abort();
  await assert.rejects(pending, (e: SluiceError) => e instanceof SluiceError && e.code === 'cancelled');
  assert.equal(server.received[1]!.type, 'cancel');
  s.close();
});

test('an error event becomes a SluiceError thrown from the loop and rejected from result', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    session.delta(request.id, 'partial');
    session.emit({
      type: 'error',
      id: request.id,
      code: 'upstream_unavailable',
      message: 'ollama is down',
      retryable: true,
      retry_after_ms: 2000,
    });
  };
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  const pieces: string[] = [];
  await assert.rejects(
    async () => {
      for await (const piece of stream) pieces.push(piece);
    },
    (error: SluiceError) => {
      assert.ok(error instanceof SluiceError);
      assert.equal(error.code, 'upstream_unavailable');
      assert.equal(error.message, 'ollama is down');
      assert.equal(error.retryable, true);
      assert.equal(error.retryAfterMs, 2000);
      assert.equal(error.requestId, stream.id);
      return true;
    },
  );
  assert.deepEqual(pieces, ['partial']);
  await assert.rejects(stream.result, { code: 'upstream_unavailable' });
  s.close();
});

test('an id-less refusal naming our request fails it; one naming nothing is a session error event', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    session.inflight.delete(request.id);
    session.emit({
      type: 'error',
      ref: request.id,
      code: 'too_many_inflight',
      message: 'limit',
      retryable: true,
    });
  };
  const s = await open(server);
  await assert.rejects(s.embed('x'), (e: SluiceError) => e.code === 'too_many_inflight' && e.retryable);
  const errors: SluiceError[] = [];
  s.on('error', (e) => errors.push(e));
  server.session.emit({ type: 'error', code: 'invalid_message', message: 'bad json', retryable: false });
  await until(() => errors.length === 1, 2000, 'error event');
  assert.equal(errors[0]!.code, 'invalid_message');
  s.close();
});

test('close() fails what is in flight with closed, and later requests too', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  const embed = s.embed('x');
  await until(() => server.received.length === 2, 2000, 'requests');
  s.close();
  await assert.rejects(stream.result, (e: SluiceError) => e.code === 'closed' && !e.retryable);
  await assert.rejects(embed, { code: 'closed' });
  await assert.rejects(s.classify('x', ['a', 'b']), { code: 'closed' });
  assert.equal(server.sockets[0]!.closedWith, 1000);
});

test('generate needs exactly one of prompt or messages', async () => {
  const server = new FakeServer();
  const s = await open(server);
  assert.throws(() => s.generate({}), { code: 'invalid_request' });
  assert.throws(() => s.generate({ prompt: 'a', messages: [{ role: 'user', content: 'b' }] }), {
    code: 'invalid_request',
  });
  s.close();
});
