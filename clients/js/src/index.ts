/**
 * sluice-client: the public API, and nothing else (a test pins these names).
 *
 * `connect()` opens a session over WebSocket, falling back to SSE; on it, `generate()` streams
 * (text, and tool calls when given `tools`), `embed()` and `classify()` answer, all at once, each
 * request told apart by its id.
 */

export { connect, Session } from './session.js';
export type {
  ConnectOptions,
  GenerateParams,
  EmbedOptions,
  ClassifyOptions,
  SessionEvents,
} from './session.js';
export type { ConnectionState, StateChange, TransportChoice } from './connection.js';
export { GenerateStream, ToolCall } from './requests.js';
export type { GenerateResult, EmbedResult, ClassifyResult, StreamItem } from './requests.js';
export { SluiceError } from './errors.js';
export { PROTOCOL_ERROR_CODES, CLIENT_ERROR_CODES, isRetryable } from './codes.js';
export type { ErrorCode, ProtocolErrorCode, ClientErrorCode } from './codes.js';
export type {
  TransportName,
  WebSocketConstructor,
  WebSocketLike,
  EventSourceConstructor,
  EventSourceLike,
  FetchLike,
} from './transport.js';
export type {
  ChatMessage,
  ClientMessage,
  ServerMessage,
  LoggedMessage,
  GenerateOptions,
  OutputFormat,
  JsonSchema,
  Tool,
  ToolFunction,
  ToolChoice,
  NamedToolChoice,
  MessageToolCall,
  FunctionCall,
  ToolCallEvent,
  Welcome,
  Done,
  Usage,
  Timings,
  LabelScore,
  Limits,
  Models,
} from './messages.js';
