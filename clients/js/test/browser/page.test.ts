// The chat page in Debian's headless Chromium (playwright-core, never a downloaded browser) against
// the real server: it streams a reply; with WebSocket refused by a proxy it works over SSE; a
// connection cut mid-reply resumes without a lost or doubled token. Writes test-results/chat.png.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { type BrowserContext, chromium, type Page } from 'playwright-core';
import WebSocket from 'ws';
import { connect } from '../../src/index.js';
import { MODEL, type Stack, startStack, unavailable } from '../support/stack.js';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const RESULTS = fileURLToPath(new URL('../../../test-results/', import.meta.url));
const PROMPT = 'tell me about the river';
const why =
  unavailable() ??
  (existsSync(CHROMIUM) ? undefined : `no Chromium at ${CHROMIUM} (apt-get install chromium)`);

let stack: Stack;
let context: BrowserContext | undefined;
let profile: string | undefined;

/** What the emulator answers to the page's first message, from an uninterrupted Node client run. */
async function reference(): Promise<string> {
  const s = await connect({ url: stack.url, WebSocket, transport: 'websocket' });
  try {
    const stream = s.generate({ messages: [{ role: 'user', content: PROMPT }], model: MODEL });
    for await (const _ of stream);
    return (await stream.result).text;
  } finally {
    s.close();
  }
}

async function openPage(base: string, query = ''): Promise<Page> {
  assert.ok(context);
  const page = await context.newPage();
  page.on('pageerror', (error) => console.error('page error:', error));
  await page.goto(`${base}/?model=${encodeURIComponent(MODEL)}${query}`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 20_000 });
  return page;
}

async function ask(page: Page, prompt: string): Promise<void> {
  await page.fill('[data-testid="prompt"]', prompt);
  await page.press('[data-testid="prompt"]', 'Enter');
  await page.waitForSelector('[data-testid="reply"]');
}

async function finishedReply(page: Page): Promise<{ status: string; text: string }> {
  const reply = page.locator('[data-testid="reply"]').last();
  await page.waitForSelector('[data-testid="reply"]:not([data-status="streaming"])', { timeout: 30_000 });
  return {
    status: (await reply.getAttribute('data-status')) ?? '',
    text: (await reply.locator('.text').textContent()) ?? '',
  };
}

describe('the chat page in Chromium', { skip: why }, () => {
  before(async () => {
    stack = await startStack({ tokenRate: 12, tokens: 36 });
    if (!stack.page) return;
    profile = mkdtempSync(join(tmpdir(), 'sluice-chromium-'));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--disable-quic',
        '--no-first-run',
      ],
      viewport: { width: 1280, height: 820 },
    });
  });
  after(async () => {
    await context?.close();
    if (profile !== undefined) rmSync(profile, { recursive: true, force: true });
    await stack?.stop();
  });

  test('streams a reply over WebSocket, runs the embed and classify demos, and looks right', async (t) => {
    if (!stack.page) return t.skip('the server does not serve the chat page at / yet (mount server/static)');
    const expected = await reference();
    const page = await openPage(stack.url);
    assert.equal(await page.textContent('[data-testid="transport"]'), 'WebSocket');
    assert.equal(await page.textContent('[data-testid="state"]'), 'connected');
    await ask(page, PROMPT);
    await page.waitForSelector('[data-testid="reply"][data-status="streaming"]');
    await page.waitForSelector('[data-testid="stop"]:not([hidden])');
    const reply = await finishedReply(page);
    assert.equal(reply.status, 'done');
    assert.equal(reply.text, expected);
    assert.match((await page.textContent('[data-testid="stats"]')) ?? '', /completion \d+ tok/);

    await page.click('[data-testid="embed-run"]');
    await page.waitForSelector('[data-testid="embed-result"] table');
    assert.equal(await page.locator('[data-testid="embed-result"] tr').count(), 4);
    await page.click('[data-testid="classify-run"]');
    await page.waitForSelector('[data-testid="classify-result"] .bar-row');
    assert.equal(await page.locator('[data-testid="classify-result"] .bar-row').count(), 3);

    mkdirSync(RESULTS, { recursive: true });
    await page.setViewportSize({ width: 1280, height: 940 });
    await page.screenshot({ path: join(RESULTS, 'chat.png') });
    await page.close();
  });

  test("the README's browser example runs as written", async (t) => {
    if (!stack.page) return t.skip('the server does not serve the chat page at / yet (mount server/static)');
    const readme = readFileSync(fileURLToPath(new URL('../../../README.md', import.meta.url)), 'utf8');
    const example = /```html\n<script type="module">\n([\s\S]*?)<\/script>\n```/.exec(readme)?.[1];
    assert.ok(example, 'README.md has the browser example');
    assert.ok(example.split('\n').filter((line) => line.trim() !== '').length <= 10, 'ten lines at most');
    const page = await openPage(stack.url);
    const logs: string[] = [];
    page.on('console', (message) => logs.push(message.text()));
    // As written, it generates with the server's default model (the stack makes that the emulator's).
    await page.addScriptTag({ type: 'module', content: example });
    await page.waitForFunction(
      () => /tokens in/.test(document.querySelector('body > pre')?.textContent ?? ''),
      null,
      {
        timeout: 30_000,
      },
    );
    const deadline = Date.now() + 10_000;
    while (!logs.some((line) => /^\d+ /.test(line)) && Date.now() < deadline) await page.waitForTimeout(50);
    // "<dimensions> [{label, score}, {label, score}]" from the example's last line.
    assert.ok(
      logs.some((line) => /^\d+ \[Object, Object\]$/.test(line)),
      logs.join('\n'),
    );
    await page.close();
  });

  test('with WebSocket refused by a proxy, the page works over SSE', async (t) => {
    if (!stack.page) return t.skip('the server does not serve the chat page at / yet (mount server/static)');
    if (!stack.sse) return t.skip('the server has no SSE endpoints (POST /v1/sessions) yet');
    const expected = await reference();
    stack.proxy.refuseWebSocket = true;
    const upgradesBefore = stack.proxy.upgrades;
    try {
      const page = await openPage(stack.proxyUrl);
      assert.equal(await page.textContent('[data-testid="transport"]'), 'SSE');
      assert.ok(stack.proxy.upgrades > upgradesBefore, 'the page tried WebSocket first');
      await ask(page, PROMPT);
      const reply = await finishedReply(page);
      assert.equal(reply.status, 'done');
      assert.equal(reply.text, expected);
      await page.close();
    } finally {
      stack.proxy.refuseWebSocket = false;
    }
  });

  test('a connection cut mid-reply resumes without a lost or doubled token', async (t) => {
    if (!stack.page) return t.skip('the server does not serve the chat page at / yet (mount server/static)');
    const expected = await reference();
    const page = await openPage(stack.proxyUrl);
    await ask(page, PROMPT);
    // Cut once a few words are on screen, while the rest is still being generated.
    await page.waitForFunction(
      () => (document.querySelector('[data-testid="reply"] .text')?.textContent ?? '').length > 15,
    );
    assert.ok(stack.proxy.cut() > 0);
    await page.waitForSelector('[data-testid="conn"][data-reconnects]');
    const reply = await finishedReply(page);
    assert.equal(reply.status, 'done');
    assert.equal(reply.text, expected);
    assert.equal(await page.textContent('[data-testid="state"]'), 'connected');
    assert.match((await page.textContent('[data-testid="banner"]')) ?? '', /Reconnected/);
    mkdirSync(RESULTS, { recursive: true });
    await page.screenshot({ path: join(RESULTS, 'reconnected.png') });
    await page.close();
  });
});

if (why !== undefined) {
  test('browser tests need the real server and Chromium', (t) => t.skip(why));
}
