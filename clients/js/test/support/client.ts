// Connects the real client to a FakeServer through injected constructors, with fast timers.
// Every session opened here is closed after each test, so a failing test cannot leave timers or
// streams behind that keep the test process alive.
import { afterEach } from 'node:test';
import { type ConnectOptions, Session } from '../../src/session.js';
import type { FakeServer } from './fake_server.js';

const opened = new Set<Session>();

afterEach(() => {
  for (const session of opened) session.close();
  opened.clear();
});

export async function open(server: FakeServer, options: ConnectOptions = {}): Promise<Session> {
  const session = new Session({
    url: 'http://fake.test',
    WebSocket: server.WebSocket,
    fetch: server.fetch,
    reconnect: { minDelayMs: 1, maxDelayMs: 5 },
    ackIntervalMs: 0,
    openTimeoutMs: 1000,
    ...options,
  });
  opened.add(session);
  await session.ready;
  return session;
}

/** Collect a stream's pieces. */
export async function collect(stream: AsyncIterable<string>): Promise<string[]> {
  const pieces: string[] = [];
  for await (const piece of stream) pieces.push(piece);
  return pieces;
}

/** base64 of little-endian float32, as the server encodes embeddings. */
export function float32Base64(values: number[]): string {
  const bytes = new Uint8Array(new Float32Array(values).buffer);
  return btoa(String.fromCharCode(...bytes));
}
