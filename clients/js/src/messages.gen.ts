/* eslint-disable */
/**
 * The messages of PROTOCOL.md §1, generated from protocol/schema/messages.schema.json by
 * scripts/gen-types.mjs (json-schema-to-typescript). Do not edit: run `npm run gen`.
 */

/**
 * Every message of the sluice protocol: $defs/ClientMessage (client to server), $defs/ServerMessage (server to client), $defs/LoggedMessage (server messages that carry seq).
 */
export type SluiceProtocolV1Messages = ClientMessage | ServerMessage;
export type ClientMessage = Hello | Generate | Embed | Classify | Cancel | Ping | Ack;
export type Generate = Generate1 & Generate2;
export type Generate1 =
  | {
      prompt: string;
    }
  | {
      messages: unknown[];
    };
export type ServerMessage =
  Welcome | Delta | ToolCall | Done | Embedding | Classification | Error | Pong | Goaway;
export type ErrorCode =
  | 'invalid_message'
  | 'unknown_type'
  | 'unsupported_protocol'
  | 'duplicate_id'
  | 'message_too_large'
  | 'too_many_inflight'
  | 'unauthorized'
  | 'forbidden'
  | 'rate_limited'
  | 'invalid_request'
  | 'model_not_found'
  | 'upstream_unavailable'
  | 'upstream_error'
  | 'overloaded'
  | 'timeout'
  | 'cancelled'
  | 'slow_consumer'
  | 'shutting_down'
  | 'internal';

export interface Hello {
  client?: string | null;
  last_seq?: number | null;
  protocol?: number;
  session?: string | null;
  token?: string | null;
  type: 'hello';
}
export interface Generate2 {
  format?:
    | 'json'
    | {
        [k: string]: unknown;
      }
    | null;
  history?: boolean;
  id: string;
  messages?: [ChatMessage, ...ChatMessage[]] | null;
  model?: string | null;
  options?: GenerateOptions;
  prompt?: string | null;
  system?: string | null;
  tool_choice?: ('auto' | 'none' | 'required') | NamedToolChoice | null;
  tools?: [Tool, ...Tool[]] | null;
  type: 'generate';
}
export interface ChatMessage {
  content: string;
  role: 'system' | 'user' | 'assistant' | 'tool';
  tool_call_id?: string | null;
  tool_calls?: MessageToolCall[] | null;
}
/**
 * A call an assistant turn made, sent back in a later request; id is its call_id.
 */
export interface MessageToolCall {
  function: FunctionCall;
  id: string;
  type: 'function';
}
export interface FunctionCall {
  arguments: string;
  name: string;
}
export interface GenerateOptions {
  max_tokens?: number | null;
  seed?: number | null;
  stop?: string[] | null;
  temperature?: number | null;
  top_k?: number | null;
  top_p?: number | null;
}
export interface NamedToolChoice {
  function: FunctionName;
  type: 'function';
}
export interface FunctionName {
  name: string;
}
export interface Tool {
  function: ToolFunction;
  type: 'function';
}
export interface ToolFunction {
  description?: string | null;
  name: string;
  parameters?: {
    type: 'object';
    [k: string]: unknown;
  } | null;
}
export interface Embed {
  encoding?: 'float' | 'base64';
  id: string;
  input: string | [string, ...string[]];
  model?: string | null;
  normalize?: boolean;
  type: 'embed';
}
export interface Classify {
  id: string;
  input: string | [string, ...string[]];
  /**
   * @minItems 2
   * @maxItems 64
   */
  labels: [string, string, ...string[]];
  model?: string | null;
  multi_label?: boolean;
  type: 'classify';
}
export interface Cancel {
  id: string;
  type: 'cancel';
}
export interface Ping {
  nonce?: string | number | null;
  type: 'ping';
}
export interface Ack {
  seq: number;
  type: 'ack';
}
export interface Welcome {
  last_seq: number;
  limits: Limits;
  models: Models;
  protocol: number;
  resumed: boolean;
  server: ServerInfo;
  session: string;
  type: 'welcome';
}
export interface Limits {
  max_buffered_bytes?: number;
  max_inflight: number;
  max_message_bytes: number;
  replay_bytes?: number;
  replay_events: number;
  requests_per_minute?: number;
  session_ttl_s: number;
  sessions_per_key?: number;
  tokens_per_minute?: number;
}
export interface Models {
  classify: string[];
  embed: string[];
  generate: string[];
}
export interface ServerInfo {
  name: string;
  version: string;
}
export interface Delta {
  id: string;
  seq: number;
  text: string;
  type: 'delta';
}
export interface ToolCall {
  arguments: string;
  call_id: string;
  id: string;
  index: number;
  name: string;
  seq: number;
  type: 'tool_call';
}
export interface Done {
  finish_reason: 'stop' | 'length' | 'tool_calls' | 'cancelled';
  id: string;
  model: string;
  seq: number;
  timings: Timings;
  type: 'done';
  usage: Usage;
}
export interface Timings {
  queue_ms: number;
  total_ms: number;
  ttft_ms: number | null;
}
export interface Usage {
  completion_tokens: number;
  prompt_tokens: number;
}
export interface Embedding {
  dimensions: number;
  embeddings: number[][] | string[];
  id: string;
  model: string;
  seq: number;
  type: 'embedding';
}
export interface Classification {
  id: string;
  model: string;
  results: LabelScore[][];
  seq: number;
  type: 'classification';
}
export interface LabelScore {
  label: string;
  score: number;
}
export interface Error {
  code: ErrorCode;
  id?: string;
  message: string;
  ref?: string;
  retry_after_ms?: number;
  retryable: boolean;
  seq: number;
  type: 'error';
}
export interface Pong {
  nonce?: string | number;
  type: 'pong';
}
export interface Goaway {
  reason: string;
  retry_after_ms: number;
  seq: number;
  type: 'goaway';
}
