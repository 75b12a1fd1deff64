// Which transport the client ends up on: WebSocket first, SSE when the WebSocket cannot be held.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { SluiceError } from '../../src/errors.js';
import { collect, open } from '../support/client.js';
import { FakeServer, until } from '../support/fake_server.js';

function answerWith(server: FakeServer, text: string): void {
  server.onRequest = (session, request) => {
    session.delta(request.id, text);
    session.done(request.id);
  };
}

test('auto: a WebSocket that cannot open falls back to SSE at connect', async () => {
  const server = new FakeServer({ refuseWebSocket: true });
  answerWith(server, 'over sse');
  const s = await open(server);
  assert.equal(s.transport, 'sse');
  assert.equal(server.sockets.length, 1);
  const post = server.fetches[0]!;
  assert.equal(post.method, 'POST');
  assert.equal(post.url, 'http://fake.test/v1/sessions');
  assert.deepEqual(post.body, { type: 'hello', protocol: 1 });
  assert.deepEqual(await collect(s.generate({ prompt: 'p' })), ['over sse']);
  s.close();
});

test('auto: a WebSocket that opens but dies before the welcome falls back to SSE at connect', async () => {
  const server = new FakeServer({ dropBeforeWelcome: true });
  answerWith(server, 'fine');
  const s = await open(server);
  assert.equal(s.transport, 'sse');
  assert.equal(server.sockets[0]!.sent[0]!.type, 'hello');
  assert.deepEqual(await collect(s.generate({ prompt: 'p' })), ['fine']);
  s.close();
});

test('auto: a WebSocket killed young three times in a row moves the session to SSE, resumed', async () => {
  const server = new FakeServer({ killWebSocketAfterWelcome: 3 });
  answerWith(server, 'hi');
  const s = await open(server);
  await until(() => s.transport === 'sse' && s.state === 'connected', 2000, 'fallback to SSE');
  assert.equal(server.sockets.length, 3);
  assert.equal(server.sessions.size, 1, 'the same session moved transports');
  assert.equal(server.hellos.at(-1)!.transport, 'sse');
  assert.deepEqual(await collect(s.generate({ prompt: 'p' })), ['hi']);
  s.close();
});

test('auto: one kill is not enough to give up on WebSocket', async () => {
  const server = new FakeServer({ killWebSocketAfterWelcome: 1 });
  const s = await open(server);
  await until(() => server.sockets.length === 2 && s.state === 'connected', 2000, 'reconnect');
  assert.equal(s.transport, 'websocket');
  s.close();
});

test('auto without any WebSocket constructor goes straight to SSE', async () => {
  const server = new FakeServer();
  const hadWebSocket = 'WebSocket' in globalThis;
  assert.equal(hadWebSocket, false, 'Node 20 has no global WebSocket without a flag');
  const s = await open(server, { WebSocket: undefined });
  assert.equal(s.transport, 'sse');
  assert.equal(server.sockets.length, 0);
  s.close();
});

test('transport "websocket" never uses SSE: a refused upgrade rejects connect', async () => {
  const server = new FakeServer({ refuseWebSocket: true });
  await assert.rejects(
    open(server, { transport: 'websocket' }),
    (e: SluiceError) => e.code === 'connection_failed' && e.retryable,
  );
  assert.equal(server.fetches.length, 0);
});

test('transport "sse" never opens a WebSocket', async () => {
  const server = new FakeServer();
  const s = await open(server, { transport: 'sse' });
  assert.equal(s.transport, 'sse');
  assert.equal(server.sockets.length, 0);
  s.close();
});

test('auto: both transports failing rejects connect with connection_failed', async () => {
  const server = new FakeServer({ refuseWebSocket: true, noSse: true });
  await assert.rejects(
    open(server),
    (e: SluiceError) => e.code === 'connection_failed' && /no SSE/.test(e.message),
  );
});

test('a typed refusal (unauthorized) rejects connect and is not retried', async () => {
  const server = new FakeServer({
    refuseWebSocket: true,
    refuseSession: { status: 401, code: 'unauthorized', message: 'bad key' },
  });
  await assert.rejects(
    open(server, { token: 'nope' }),
    (e: SluiceError) => e.code === 'unauthorized' && e.message === 'bad key' && !e.retryable,
  );
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(server.fetches.length, 1);
  assert.equal(server.fetches[0]!.headers.get('authorization'), 'Bearer nope');
});

test('an error before the welcome explains the WebSocket close: unsupported_protocol is fatal', async () => {
  const server = new FakeServer();
  // A server that refuses the hello: an error frame, then close 1008.
  class Refusing {
    readyState = 0;
    onopen: ((e: unknown) => void) | null = null;
    onmessage: ((e: { data: unknown }) => void) | null = null;
    onclose: ((e: { code: number; reason: string }) => void) | null = null;
    onerror: ((e: unknown) => void) | null = null;
    constructor() {
      setTimeout(() => {
        this.readyState = 1;
        this.onopen?.({});
      }, 0);
    }
    send(): void {
      setTimeout(() => {
        this.onmessage?.({
          data: JSON.stringify({
            type: 'error',
            seq: 1,
            code: 'unsupported_protocol',
            message: 'protocol 1 only',
            retryable: false,
          }),
        });
        this.readyState = 3;
        this.onclose?.({ code: 1008, reason: '' });
      }, 0);
    }
    close(): void {}
  }
  await assert.rejects(
    open(server, { WebSocket: Refusing, transport: 'websocket' }),
    (e: SluiceError) => e.code === 'unsupported_protocol' && e.message === 'protocol 1 only',
  );
});
