// The SSE transport through the fake server's fetch: bytes split anywhere, resume with
// last_event_id, ordered batched POSTs, auth headers, EventSource mode, refusals.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { SluiceError } from '../../src/errors.js';
import { collect, open } from '../support/client.js';
import { FakeServer, until } from '../support/fake_server.js';

const TEXT = ['h\u00e9', '\u{1F600}', ' \u4e16\u754c', ' caf\u00e9'];

test('a stream delivered one byte per chunk arrives intact (UTF-8 split across chunks)', async () => {
  const server = new FakeServer({ sseChunkBytes: 1 });
  server.onRequest = (session, request) => {
    for (const piece of TEXT) session.delta(request.id, piece);
    session.done(request.id);
  };
  const s = await open(server, { transport: 'sse' });
  assert.deepEqual(await collect(s.generate({ prompt: 'p' })), TEXT);
  s.close();
});

test('a dropped event stream resumes with last_event_id and the same session', async () => {
  const server = new FakeServer({ replayOverlap: 1 });
  const s = await open(server, { transport: 'sse' });
  const stream = s.generate({ prompt: 'p' });
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.delta(stream.id, 'one ');
  await until(() => s.lastSeq === 1, 2000, 'first delta');
  server.session.drop();
  server.session.delta(stream.id, 'two');
  server.session.done(stream.id);
  assert.deepEqual(await collect(stream), ['one ', 'two']);
  const hellos = server.hellos.filter((h) => h.transport === 'sse');
  assert.deepEqual(hellos[1]!.hello, { type: 'hello', protocol: 1, session: 's1', last_seq: 1 });
  const gets = server.fetches.filter((f) => f.method === 'GET');
  assert.equal(new URL(gets[1]!.url).searchParams.get('last_event_id'), '1');
  assert.equal(gets[1]!.headers.get('last-event-id'), '1');
  assert.equal(gets[1]!.headers.get('accept'), 'text/event-stream');
  s.close();
});

test('messages sent together go out in order, batched into fewer POSTs', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) =>
    session.emit({ type: 'embedding', id: request.id, model: 'm', dimensions: 1, embeddings: [[1]] });
  const s = await open(server, { transport: 'sse' });
  const texts = Array.from({ length: 20 }, (_, i) => `text ${i}`);
  const results = await Promise.all(texts.map((t) => s.embed(t)));
  assert.equal(results.length, 20);
  const received = server.received.filter((m) => m.type === 'embed');
  assert.deepEqual(
    received.map((m) => (m.type === 'embed' ? m.input : [])),
    texts.map((t) => [t]),
  );
  const posts = server.fetches.filter((f) => f.method === 'POST' && f.url.endsWith('/messages'));
  assert.ok(posts.length < 20, `${posts.length} POSTs for 20 messages`);
  assert.ok(posts.some((p) => Array.isArray(p.body)));
  s.close();
});

test('the token goes in an Authorization header on every request, never in hello or a URL', async () => {
  const server = new FakeServer();
  const s = await open(server, { transport: 'sse', token: 'sk-secret' });
  await until(() => server.fetches.some((f) => f.method === 'GET'), 2000, 'event stream');
  for (const f of server.fetches) {
    assert.equal(f.headers.get('authorization'), 'Bearer sk-secret', `${f.method} ${f.url}`);
    assert.ok(!f.url.includes('sk-secret'));
  }
  assert.equal(server.hellos[0]!.hello.token, undefined);
  s.close();
});

test('over WebSocket the token travels in hello, and a ticket in the URL', async () => {
  const server = new FakeServer();
  let issued = 0;
  const s = await open(server, { transport: 'websocket', token: 'sk-secret', ticket: () => `t${++issued}` });
  assert.equal(server.hellos[0]!.hello.token, 'sk-secret');
  assert.equal(server.sockets[0]!.url, 'ws://fake.test/v1/ws?ticket=t1');
  server.session.drop();
  await until(() => server.sockets.length === 2, 2000, 'reconnect');
  assert.equal(
    server.sockets[1]!.url,
    'ws://fake.test/v1/ws?ticket=t2',
    'a fresh single-use ticket per connection',
  );
  s.close();
});

test('EventSource mode reads the same events, ticket on the URL', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    for (const piece of TEXT) session.delta(request.id, piece);
    session.done(request.id);
  };
  const s = await open(server, { transport: 'sse', EventSource: server.EventSource, ticket: 'tk' });
  assert.deepEqual(await collect(s.generate({ prompt: 'p' })), TEXT);
  const get = server.fetches.find((f) => f.method === 'GET')!;
  const url = new URL(get.url);
  assert.equal(url.pathname, '/v1/sessions/s1/events');
  assert.equal(url.searchParams.get('ticket'), 'tk');
  assert.equal(url.searchParams.get('last_event_id'), '0');
  s.close();
});

test('close() over SSE ends the session on the server (DELETE)', async () => {
  const server = new FakeServer();
  const s = await open(server, { transport: 'sse' });
  s.close();
  await until(() => server.fetches.some((f) => f.method === 'DELETE'), 2000, 'DELETE');
  assert.equal(server.fetches.find((f) => f.method === 'DELETE')!.url, 'http://fake.test/v1/sessions/s1');
});

test('a POST refused with a typed error fails the requests it carried', async () => {
  const server = new FakeServer({
    refuseMessages: { status: 429, code: 'rate_limited', message: 'too many' },
  });
  const s = await open(server, { transport: 'sse' });
  const errors: SluiceError[] = [];
  s.on('error', (e) => errors.push(e));
  await assert.rejects(
    s.embed('x'),
    (e: SluiceError) => e.code === 'rate_limited' && e.message === 'too many',
  );
  await until(() => s.lastSeq === 1, 2000, 'the refusal event');
  assert.equal(s.state, 'connected');
  assert.deepEqual(errors, [], 'reported once, to the request, not again to the session');
  s.close();
});

test("the stream's `event: close` 4009 (taken over) ends the session without reconnecting", async () => {
  const server = new FakeServer();
  const s = await open(server, { transport: 'sse' });
  const pending = s.embed('x');
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.drop(4009);
  await assert.rejects(pending, { code: 'closed' });
  assert.equal(s.state, 'closed');
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(server.hellos.length, 1, 'no reconnect');
});

test('`event: close` 1012 after a goaway reconnects and resumes over SSE', async () => {
  const server = new FakeServer();
  const s = await open(server, { transport: 'sse' });
  const stream = s.generate({ prompt: 'p' });
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.delta(stream.id, 'a');
  server.session.emit({ type: 'goaway', reason: 'draining', retry_after_ms: 5 });
  server.session.drop(1012);
  server.session.delta(stream.id, 'b');
  server.session.done(stream.id);
  assert.deepEqual(await collect(stream), ['a', 'b']);
  assert.equal(server.hellos.length, 2);
  s.close();
});
