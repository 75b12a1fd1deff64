/**
 * The wire messages under the names the client uses, and the one function that turns a decoded
 * JSON value from the server into a typed message.
 *
 * The shapes come from `messages.gen.ts` (generated from the server's JSON Schema); this module
 * only renames and narrows. It must never build protocol behaviour (that is `session.ts`).
 */

import type {
  Ack,
  Cancel,
  ChatMessage,
  Classification,
  Classify,
  ClientMessage,
  Delta,
  Done,
  Embed,
  Embedding,
  Error as ErrorMessage,
  FunctionCall,
  Generate,
  GenerateOptions,
  Goaway,
  Hello,
  LabelScore,
  Limits,
  MessageToolCall,
  Models,
  NamedToolChoice,
  Ping,
  Pong,
  ServerInfo,
  ServerMessage,
  Timings,
  Tool,
  ToolCall as ToolCallEvent,
  ToolFunction,
  Usage,
  Welcome,
} from './messages.gen.js';

export type {
  Ack,
  Cancel,
  ChatMessage,
  Classification,
  Classify,
  ClientMessage,
  Delta,
  Done,
  Embed,
  Embedding,
  ErrorMessage,
  FunctionCall,
  Generate,
  GenerateOptions,
  Goaway,
  Hello,
  LabelScore,
  Limits,
  MessageToolCall,
  Models,
  NamedToolChoice,
  Ping,
  Pong,
  ServerInfo,
  ServerMessage,
  Timings,
  Tool,
  ToolCallEvent,
  ToolFunction,
  Usage,
  Welcome,
};

/** `format` of a generate: `"json"`, or a JSON Schema the reply text is an instance of. */
export type OutputFormat = NonNullable<Generate['format']>;
/** A JSON Schema, as `format` and a tool's `parameters` carry it. */
export type JsonSchema = { [key: string]: unknown };
/** `"auto"` (the default), `"none"`, `"required"`, or `{type: 'function', function: {name}}`. */
export type ToolChoice = NonNullable<Generate['tool_choice']>;

export const PROTOCOL_VERSION = 1;

export type RequestMessage = Generate | Embed | Classify;

/** The messages that carry `seq` and make up the session's event log (PROTOCOL.md §1). */
export type LoggedMessage = Exclude<ServerMessage, { type: 'welcome' } | { type: 'pong' }>;

const LOGGED = new Set(['delta', 'tool_call', 'done', 'embedding', 'classification', 'error', 'goaway']);

/**
 * Narrow one decoded JSON value to a server message, or `undefined` when it is not one we know
 * (a newer server may add types: unknown ones are skipped, never fatal). Logged messages must
 * carry an integer `seq`, since resume depends on it.
 */
export function asServerMessage(value: unknown): ServerMessage | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const type = (value as { type?: unknown }).type;
  if (typeof type !== 'string') return undefined;
  if (LOGGED.has(type)) {
    return Number.isSafeInteger((value as { seq?: unknown }).seq) ? (value as ServerMessage) : undefined;
  }
  if (type === 'welcome') {
    const session = (value as { session?: unknown }).session;
    return typeof session === 'string' ? (value as ServerMessage) : undefined;
  }
  return type === 'pong' ? (value as ServerMessage) : undefined;
}

/** Parse one JSON text (a WebSocket frame, an SSE `data:` field) into a server message. */
export function parseServerMessage(text: string): ServerMessage | undefined {
  try {
    return asServerMessage(JSON.parse(text));
  } catch {
    return undefined;
  }
}

export function isLogged(message: ServerMessage): message is LoggedMessage {
  return message.type !== 'welcome' && message.type !== 'pong';
}
