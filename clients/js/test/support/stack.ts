/**
 * The real thing for integration and browser tests: the Ollama emulator and `sluice serve` as
 * subprocesses on free loopback ports, and a TCP proxy in front of the server that a test can
 * cut (every connection through it dies at once, as when a network or a proxy drops them).
 *
 * `SLUICE_TEST_URL` points the tests at a server that is already running instead (it must be
 * backed by the emulator's models). Nothing here binds beyond 127.0.0.1, and every process it
 * starts is stopped by `stop()`.
 */

import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createServer, type Server, type Socket, connect as tcpConnect, type AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../../../../', import.meta.url));
const PYTHON = process.env.SLUICE_PYTHON ?? `${ROOT}.venv/bin/python`;
const READY_TIMEOUT_MS = 240_000;

/** The emulator model the tests generate with (deterministic text for given messages and seed). */
export const MODEL = 'llama3.2:1b';

export interface Stack {
  /** The server's own base URL. */
  readonly url: string;
  /** The base URL through the cuttable proxy. */
  readonly proxyUrl: string;
  readonly proxy: CuttableProxy;
  /** Whether the SSE endpoints (`POST /v1/sessions`) exist on this server yet. */
  readonly sse: boolean;
  /** Whether the chat page is served at `/`. */
  readonly page: boolean;
  stop(): Promise<void>;
}

/** Why the real server cannot be started here, or undefined when it can. */
export function unavailable(): string | undefined {
  if (process.env.SLUICE_TEST_URL !== undefined) return undefined;
  if (!existsSync(PYTHON)) return `no Python at ${PYTHON} (run make install)`;
  if (!existsSync(`${ROOT}server/app.py`)) return 'the server (server/app.py) does not exist yet';
  if (!existsSync(`${ROOT}tests/support/ollama_emulator.py`))
    return 'tests/support/ollama_emulator.py does not exist yet';
  return undefined;
}

export async function startStack(options: { tokenRate?: number; tokens?: number } = {}): Promise<Stack> {
  const children: ChildProcess[] = [];
  const stopChildren = async (): Promise<void> => {
    await Promise.all(children.map((child) => stopProcess(child)));
  };
  try {
    let url = process.env.SLUICE_TEST_URL?.replace(/\/$/, '');
    if (url === undefined) {
      const emulatorPort = await freePort();
      const emulator = spawn(
        PYTHON,
        [
          '-m',
          'tests.support.ollama_emulator',
          '--port',
          String(emulatorPort),
          '--token-rate',
          String(options.tokenRate ?? 40),
          '--tokens',
          String(options.tokens ?? 24),
        ],
        { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      children.push(emulator);
      await waitForOutput(emulator, /listening on/, 30_000, 'the Ollama emulator');
      const port = await freePort();
      const server = spawn(`${ROOT}.venv/bin/sluice`, ['serve'], {
        cwd: ROOT,
        stdio: ['ignore', 'pipe', 'pipe'],
        env: {
          ...process.env,
          HF_HUB_OFFLINE: '1',
          TRANSFORMERS_OFFLINE: '1',
          TOKENIZERS_PARALLELISM: 'false',
          SLUICE_HOST: '127.0.0.1',
          SLUICE_PORT: String(port),
          SLUICE_OLLAMA_URLS: `http://127.0.0.1:${emulatorPort}`,
          // The tests generate with the emulator; loading the local LLM would only cost minutes.
          SLUICE_LOAD_LOCAL_GENERATION: 'false',
          SLUICE_DEFAULT_MODEL: MODEL,
          SLUICE_LOG_LEVEL: 'warning',
        },
      });
      children.push(server);
      url = `http://127.0.0.1:${port}`;
      await waitReady(url, server);
    }
    const proxy = await CuttableProxy.start(new URL(url).port === '' ? 80 : Number(new URL(url).port));
    const sse = await probe(`${url}/v1/sessions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: '{"type":"hello","protocol":1}',
    });
    const page = await probe(`${url}/`, {}, (text) => text.includes('app.js'));
    return {
      url,
      proxyUrl: `http://127.0.0.1:${proxy.port}`,
      proxy,
      sse,
      page,
      stop: async () => {
        await proxy.close();
        await stopChildren();
      },
    };
  } catch (error) {
    await stopChildren();
    throw error;
  }
}

async function probe(
  url: string,
  init: RequestInit,
  check: (text: string) => boolean = () => true,
): Promise<boolean> {
  try {
    const response = await fetch(url, init);
    const text = await response.text();
    return response.ok && check(text);
  } catch {
    return false;
  }
}

async function waitReady(url: string, child: ChildProcess): Promise<void> {
  const log: string[] = [];
  child.stdout?.on('data', (chunk: Buffer) => log.push(chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => log.push(chunk.toString()));
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (child.exitCode !== null)
      throw new Error(`sluice exited with ${child.exitCode}:\n${log.join('').slice(-4000)}`);
    try {
      if ((await fetch(`${url}/ready`)).status === 200) return;
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  throw new Error(`sluice was not ready in ${READY_TIMEOUT_MS / 1000} s:\n${log.join('').slice(-4000)}`);
}

function waitForOutput(child: ChildProcess, pattern: RegExp, timeoutMs: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(
      () => reject(new Error(`${what} did not start: ${seen.slice(-2000)}`)),
      timeoutMs,
    );
    const onData = (chunk: Buffer): void => {
      seen += chunk.toString();
      if (pattern.test(seen)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited with ${code}: ${seen.slice(-2000)}`));
    });
  });
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  await exited;
  clearTimeout(timer);
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/**
 * A loopback TCP proxy to the server. `cut()` destroys every connection through it (both sides,
 * at once), which is what a dropped network or a killing proxy does; `refuseWebSocket` makes it
 * drop every WebSocket upgrade, as proxies that cannot carry WebSockets do.
 */
export class CuttableProxy {
  refuseWebSocket = false;
  /** Connections accepted so far, and how many of them were WebSocket upgrades. */
  accepted = 0;
  upgrades = 0;
  private readonly sockets = new Set<Socket>();

  private constructor(
    private readonly server: Server,
    readonly port: number,
  ) {}

  static async start(targetPort: number): Promise<CuttableProxy> {
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const proxy = new CuttableProxy(server, (server.address() as AddressInfo).port);
    server.on('connection', (client) => proxy.accept(client, targetPort));
    return proxy;
  }

  private accept(client: Socket, targetPort: number): void {
    this.accepted += 1;
    client.once('data', (first: Buffer) => {
      const head = first.toString('latin1', 0, Math.min(first.length, 4096)).toLowerCase();
      const upgrade = head.includes('upgrade: websocket');
      if (upgrade) this.upgrades += 1;
      if (upgrade && this.refuseWebSocket) {
        client.destroy();
        return;
      }
      const upstream = tcpConnect(targetPort, '127.0.0.1');
      this.sockets.add(client);
      this.sockets.add(upstream);
      upstream.write(first);
      client.pipe(upstream);
      upstream.pipe(client);
      const end = (): void => {
        client.destroy();
        upstream.destroy();
        this.sockets.delete(client);
        this.sockets.delete(upstream);
      };
      client.on('error', end).on('close', end);
      upstream.on('error', end).on('close', end);
    });
    client.on('error', () => client.destroy());
  }

  /** Drop every open connection now. */
  cut(): number {
    const count = this.sockets.size / 2;
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
    return count;
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
