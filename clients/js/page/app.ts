/**
 * The chat page served by sluice at `/`: one session over the TypeScript client, a streaming
 * chat with a stop button, an embeddings and classification panel, and the connection's state
 * (transport, session, reconnects) in view. It only uses the client's public API.
 *
 * `?transport=websocket|sse|auto` picks the transport (default auto); `?model=` the model.
 */

import {
  type ChatMessage,
  type ClassifyResult,
  connect,
  type EmbedResult,
  type Session,
  SluiceError,
  type StateChange,
  type TransportChoice,
} from '../src/index.js';

const $ = <T extends HTMLElement>(testId: string): T => {
  const element = document.querySelector<T>(`[data-testid="${testId}"]`);
  if (element === null) throw new Error(`missing element ${testId}`);
  return element;
};

const ui = {
  conn: $('conn'),
  state: $('state'),
  transport: $('transport'),
  session: $('session'),
  banner: $('banner'),
  model: $<HTMLSelectElement>('model'),
  clear: $<HTMLButtonElement>('clear'),
  messages: $<HTMLOListElement>('messages'),
  composer: $<HTMLFormElement>('composer'),
  prompt: $<HTMLTextAreaElement>('prompt'),
  send: $<HTMLButtonElement>('send'),
  stop: $<HTMLButtonElement>('stop'),
  stats: $('stats'),
  embedInput: $<HTMLTextAreaElement>('embed-input'),
  embedRun: $<HTMLButtonElement>('embed-run'),
  embedResult: $('embed-result'),
  classifyText: $<HTMLTextAreaElement>('classify-text'),
  classifyLabels: $<HTMLInputElement>('classify-labels'),
  classifyMulti: $<HTMLInputElement>('classify-multi'),
  classifyRun: $<HTMLButtonElement>('classify-run'),
  classifyResult: $('classify-result'),
};

const TRANSPORT_NAMES = { websocket: 'WebSocket', sse: 'SSE' } as const;
const params = new URLSearchParams(location.search);
const conversation: ChatMessage[] = [];
let session: Session | undefined;
let replying: AbortController | undefined;
let reconnects = 0;
let bannerTimer: ReturnType<typeof setTimeout> | undefined;

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className?: string,
  text?: string,
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  if (className !== undefined) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function describe(error: unknown): string {
  if (error instanceof SluiceError)
    return `${error.code}: ${error.message}${error.retryable ? ' (retryable)' : ''}`;
  return error instanceof Error ? error.message : String(error);
}

function showBanner(text: string, tone: 'warn' | 'ok' | 'bad', hideAfterMs?: number): void {
  clearTimeout(bannerTimer);
  ui.banner.textContent = text;
  ui.banner.className = `banner ${tone === 'warn' ? '' : tone}`;
  ui.banner.hidden = false;
  if (hideAfterMs !== undefined) bannerTimer = setTimeout(() => (ui.banner.hidden = true), hideAfterMs);
}

function showState(change: StateChange): void {
  ui.conn.dataset.state = change.state;
  ui.state.textContent = change.state;
  ui.transport.textContent = change.transport === undefined ? '–' : TRANSPORT_NAMES[change.transport];
  ui.session.textContent = change.session ?? '–';
  ui.session.title = change.session ?? '';
  if (change.state === 'reconnecting') {
    reconnects += 1;
    ui.conn.dataset.reconnects = String(reconnects);
    showBanner(`Connection lost — reconnecting (attempt ${change.attempt ?? 1})…`, 'warn');
  } else if (change.state === 'connected' && reconnects > 0) {
    showBanner(
      `Reconnected over ${TRANSPORT_NAMES[change.transport ?? 'websocket']} — the session resumed where it left off.`,
      'ok',
      4000,
    );
  } else if (change.state === 'closed') {
    showBanner(
      `Disconnected${change.error ? ` — ${describe(change.error)}` : ''}. Reload to start a new session.`,
      'bad',
    );
  }
}

function addMessage(
  role: 'user' | 'assistant',
  text: string,
): { item: HTMLLIElement; text: HTMLSpanElement; meta: HTMLSpanElement } {
  ui.messages.querySelector('.empty')?.remove();
  const item = el('li', `msg ${role}`);
  const body = el('span', 'text', text);
  const meta = el('span', 'meta');
  item.append(body, meta);
  if (role === 'assistant') item.dataset.testid = 'reply';
  ui.messages.append(item);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return { item, text: body, meta };
}

function setReplying(active: boolean): void {
  ui.send.disabled = active;
  ui.stop.hidden = !active;
}

async function sendMessage(): Promise<void> {
  const prompt = ui.prompt.value.trim();
  if (prompt === '' || session === undefined || replying !== undefined) return;
  ui.prompt.value = '';
  conversation.push({ role: 'user', content: prompt });
  addMessage('user', prompt);
  const reply = addMessage('assistant', '');
  reply.item.dataset.status = 'streaming';
  const controller = new AbortController();
  replying = controller;
  setReplying(true);
  const model = ui.model.value || undefined;
  try {
    const stream = session.generate({ messages: [...conversation], model, signal: controller.signal });
    for await (const piece of stream) {
      reply.text.textContent += piece;
      ui.messages.scrollTop = ui.messages.scrollHeight;
    }
    if (controller.signal.aborted) {
      reply.item.dataset.status = 'stopped';
      reply.meta.textContent = 'stopped';
      if (stream.text !== '') conversation.push({ role: 'assistant', content: stream.text });
      return;
    }
    const done = await stream.result;
    conversation.push({ role: 'assistant', content: done.text });
    reply.item.dataset.status = done.finish_reason === 'cancelled' ? 'stopped' : 'done';
    const seconds = done.timings.total_ms / 1000;
    const rate = seconds > 0 ? (done.usage.completion_tokens / seconds).toFixed(1) : '–';
    reply.meta.textContent = `${done.model} · ${done.usage.completion_tokens} tokens · ${rate} tok/s`;
    ui.stats.textContent =
      `finish ${done.finish_reason} · prompt ${done.usage.prompt_tokens} tok · completion ${done.usage.completion_tokens} tok · ` +
      `queue ${done.timings.queue_ms.toFixed(0)} ms · first token ${done.timings.ttft_ms?.toFixed(0) ?? '–'} ms · total ${done.timings.total_ms.toFixed(0)} ms`;
  } catch (error) {
    reply.item.dataset.status = controller.signal.aborted ? 'stopped' : 'error';
    reply.meta.textContent = controller.signal.aborted ? 'stopped' : describe(error);
  } finally {
    replying = undefined;
    setReplying(false);
    ui.prompt.focus();
  }
}

async function runEmbed(): Promise<void> {
  const texts = ui.embedInput.value
    .split('\n')
    .map((t) => t.trim())
    .filter((t) => t !== '')
    .slice(0, 8);
  if (texts.length === 0 || session === undefined) return;
  ui.embedRun.disabled = true;
  ui.embedResult.replaceChildren(el('div', 'caption', 'embedding…'));
  try {
    renderSimilarity(texts, await session.embed(texts));
  } catch (error) {
    ui.embedResult.replaceChildren(el('div', 'error', describe(error)));
  } finally {
    ui.embedRun.disabled = false;
  }
}

function renderSimilarity(texts: string[], result: EmbedResult): void {
  const vectors = result.embeddings;
  const table = el('table', 'sim');
  const head = el('tr');
  head.append(el('th'), ...texts.map((_, i) => el('th', undefined, `#${i + 1}`)));
  table.append(head);
  vectors.forEach((a, i) => {
    const row = el('tr');
    row.append(el('th', undefined, `#${i + 1}`));
    for (const b of vectors) {
      const score = cosine(a, b);
      const cell = el('td', undefined, score.toFixed(2));
      cell.style.background = `rgb(45 212 191 / ${Math.max(0, score) * 0.55})`;
      row.append(cell);
    }
    table.append(row);
  });
  ui.embedResult.replaceChildren(
    el('div', 'caption', `${result.model} · ${result.dimensions} dimensions`),
    table,
  );
  ui.embedResult.dataset.dimensions = String(result.dimensions);
}

function cosine(a: Float32Array, b: Float32Array): number {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i += 1) {
    const x = a[i] ?? 0;
    const y = b[i] ?? 0;
    dot += x * y;
    na += x * x;
    nb += y * y;
  }
  return na === 0 || nb === 0 ? 0 : dot / Math.sqrt(na * nb);
}

async function runClassify(): Promise<void> {
  const text = ui.classifyText.value.trim();
  const labels = [
    ...new Set(
      ui.classifyLabels.value
        .split(',')
        .map((l) => l.trim())
        .filter((l) => l !== ''),
    ),
  ];
  if (text === '' || session === undefined) return;
  if (labels.length < 2) {
    ui.classifyResult.replaceChildren(el('div', 'error', 'Give at least two labels, separated by commas.'));
    return;
  }
  ui.classifyRun.disabled = true;
  ui.classifyResult.replaceChildren(el('div', 'caption', 'classifying…'));
  try {
    renderScores(await session.classify(text, labels, { multiLabel: ui.classifyMulti.checked }));
  } catch (error) {
    ui.classifyResult.replaceChildren(el('div', 'error', describe(error)));
  } finally {
    ui.classifyRun.disabled = false;
  }
}

function renderScores(result: ClassifyResult): void {
  const bars = el('div', 'bars');
  for (const { label, score } of result.results[0] ?? []) {
    const row = el('div', 'bar-row');
    const track = el('div', 'bar-track');
    const fill = el('div', 'bar-fill');
    fill.style.width = `${(score * 100).toFixed(1)}%`;
    track.append(fill);
    row.append(el('span', 'bar-label', label), track, el('span', 'bar-score', score.toFixed(3)));
    row.dataset.label = label;
    bars.append(row);
  }
  ui.classifyResult.replaceChildren(el('div', 'caption', result.model), bars);
}

async function main(): Promise<void> {
  const choice = params.get('transport');
  const transport: TransportChoice = choice === 'websocket' || choice === 'sse' ? choice : 'auto';
  const pending = connect({ url: location.origin, transport, client: 'sluice-chat-page' });
  showState({
    state: 'connecting',
    transport: transport === 'sse' ? 'sse' : 'websocket',
    session: undefined,
  });
  try {
    session = await pending;
  } catch (error) {
    showState({
      state: 'closed',
      transport: undefined,
      session: undefined,
      error: error instanceof SluiceError ? error : undefined,
    });
    showBanner(`Cannot connect — ${describe(error)}`, 'bad');
    return;
  }
  session.on('state', showState);
  showState({ state: session.state, transport: session.transport, session: session.sessionId });
  const models = session.welcome?.models.generate ?? [];
  const wanted = params.get('model');
  for (const name of wanted !== null && !models.includes(wanted) ? [wanted, ...models] : models) {
    ui.model.append(new Option(name, name, false, name === wanted));
  }
  document.body.dataset.ready = 'true';
  ui.prompt.focus();
}

ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  void sendMessage();
});
ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey) {
    event.preventDefault();
    void sendMessage();
  }
});
ui.stop.addEventListener('click', () => replying?.abort());
ui.clear.addEventListener('click', () => {
  replying?.abort();
  conversation.length = 0;
  ui.messages.replaceChildren(el('li', 'empty', 'New conversation. Ask anything.'));
  ui.stats.textContent = '';
});
ui.embedRun.addEventListener('click', () => void runEmbed());
ui.classifyRun.addEventListener('click', () => void runClassify());

void main();
