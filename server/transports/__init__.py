"""The session transports of PROTOCOL.md §3: `websocket` (``/v1/ws``) and `sse` (``/v1/sessions``).

Both admit a connection the same way (`admission`), get their session from
`server.sessions.SessionRegistry`, and feed it through `server.runtime.SessionRuntime`; neither
numbers an event, runs a model or reads the pure session's state.
"""
