// Reconnect and resume against the fake server: every event exactly once, in order, across drops,
// replays that overlap, gaps, lost sessions, lost requests and goaway.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { SluiceError } from '../../src/errors.js';
import { collect, open } from '../support/client.js';
import { FakeServer, until } from '../support/fake_server.js';

test('a drop mid-stream resumes with hello {session, last_seq}: no piece lost, none doubled', async () => {
  const server = new FakeServer({ replayOverlap: 2 });
  server.onRequest = (session, request) => {
    session.delta(request.id, 'a');
    session.delta(request.id, 'b');
  };
  const s = await open(server);
  const states: string[] = [];
  s.on('state', (change) => states.push(change.state));
  const stream = s.generate({ prompt: 'p' });
  const pieces: string[] = [];
  for await (const piece of stream) {
    pieces.push(piece);
    if (pieces.length === 2) {
      server.session.drop();
      // Produced while the client is away: only the log has them.
      server.session.delta(stream.id, 'c');
      server.session.delta(stream.id, 'd');
      await until(() => server.sockets.length === 2 && server.session.live !== undefined, 2000, 'reconnect');
      server.session.delta(stream.id, 'e');
      server.session.done(stream.id);
    }
  }
  assert.deepEqual(pieces, ['a', 'b', 'c', 'd', 'e']);
  assert.equal((await stream.result).text, 'abcde');
  assert.deepEqual(server.hellos[1]!.hello, { type: 'hello', protocol: 1, session: 's1', last_seq: 2 });
  assert.equal(s.sessionId, 's1');
  assert.equal(s.lastSeq, 6);
  assert.deepEqual(states, ['reconnecting', 'connected']);
  s.close();
});

test('a gap in seq is never delivered: the client resumes from what it has', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.delta(stream.id, 'one ');
  server.holdEvents = true;
  server.session.delta(stream.id, 'two ');
  server.holdEvents = false;
  server.session.delta(stream.id, 'three');
  server.session.done(stream.id);
  assert.deepEqual(await collect(stream), ['one ', 'two ', 'three']);
  assert.equal(server.hellos.length, 2);
  assert.equal(server.hellos[1]!.hello.last_seq, 1);
  s.close();
});

test('a request lost with the connection is sent again after the resume, and runs once', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    session.delta(request.id, 'ok');
    session.done(request.id);
  };
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  server.session.drop(); // before the server read the frame
  assert.deepEqual(await collect(stream), ['ok']);
  assert.equal(server.received.filter((m) => m.type === 'generate').length, 1);
  s.close();
});

test('a request the server already had is sent again, refused as duplicate_id, and still completes', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.drop();
  await until(() => server.received.filter((m) => m.type === 'generate').length === 2, 2000, 'resend');
  server.session.delta(stream.id, 'still here');
  server.session.done(stream.id);
  assert.deepEqual(await collect(stream), ['still here']);
  assert.ok(server.session.log.some((e) => e.type === 'error' && e.code === 'duplicate_id'));
  s.close();
});

test('a finished request whose terminal event is replayed is not sent again', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.drop();
  server.session.delta(stream.id, 'done while away');
  server.session.done(stream.id);
  assert.deepEqual(await collect(stream), ['done while away']);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(server.received.filter((m) => m.type === 'generate').length, 1);
  s.close();
});

test('a new session on resume fails in-flight requests with retryable session_lost; queued ones go on', async () => {
  const server = new FakeServer();
  const s = await open(server, { reconnect: { minDelayMs: 40, maxDelayMs: 40 } });
  const stream = s.generate({ prompt: 'p' });
  await until(() => server.received.length === 1, 2000, 'request');
  server.forgetSessions = true;
  server.session.drop();
  await until(() => s.state === 'reconnecting', 2000, 'reconnecting');
  server.onRequest = (session, request) =>
    session.emit({
      type: 'classification',
      id: request.id,
      model: 'm',
      results: [[{ label: 'a', score: 1 }]],
    });
  const queued = s.classify('while away', ['a', 'b']);
  await assert.rejects(
    stream.result,
    (e: SluiceError) => e.code === 'session_lost' && e.retryable && e.requestId === stream.id,
  );
  assert.equal((await queued).results[0]![0]!.label, 'a');
  assert.equal(s.sessionId, 's2');
  assert.equal(s.lastSeq, 1);
  s.close();
});

test('goaway: the client reconnects after retry_after_ms and resumes', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const stream = s.generate({ prompt: 'p' });
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.delta(stream.id, 'before ');
  server.session.emit({ type: 'goaway', reason: 'draining', retry_after_ms: 60 });
  const droppedAt = Date.now();
  server.session.drop(1001);
  server.session.delta(stream.id, 'after');
  server.session.done(stream.id);
  assert.deepEqual(await collect(stream), ['before ', 'after']);
  assert.ok(Date.now() - droppedAt >= 55, 'waited for retry_after_ms');
  assert.equal(server.hellos[1]!.hello.last_seq, 2);
  s.close();
});

test('acks report the newest seq received', async () => {
  const server = new FakeServer();
  server.onRequest = (session, request) => {
    session.delta(request.id, 'x');
    session.done(request.id);
  };
  const s = await open(server, { ackIntervalMs: 10 });
  await s.generate({ prompt: 'p' }).result;
  await until(() => server.received.some((m) => m.type === 'ack'), 2000, 'ack');
  assert.deepEqual(
    server.received.find((m) => m.type === 'ack'),
    { type: 'ack', seq: 2 },
  );
  s.close();
});

test('disconnected past the session TTL: requests in flight fail with connection_failed', async () => {
  const server = new FakeServer({ sessionTtlS: 0.05 });
  const s = await open(server, { transport: 'websocket' });
  const embed = s.embed('x');
  await until(() => server.received.length === 1, 2000, 'request');
  server.options.refuseWebSocket = true;
  server.session.drop();
  await assert.rejects(embed, (e: SluiceError) => e.code === 'connection_failed' && e.retryable);
  assert.equal(s.state, 'reconnecting');
  s.close();
});

test('another connection taking the session over (4009) closes this one for good', async () => {
  const server = new FakeServer();
  const s = await open(server);
  const embed = s.embed('x');
  await until(() => server.received.length === 1, 2000, 'request');
  server.session.drop(4009);
  await assert.rejects(embed, { code: 'closed' });
  assert.equal(s.state, 'closed');
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(server.sockets.length, 1, 'no reconnect');
});
