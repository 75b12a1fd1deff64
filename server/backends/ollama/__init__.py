"""The Ollama backend: the HTTP relay to one or more Ollama servers (wire format in OLLAMA.md).

Modules, from the socket up: `net` (one HTTP/1.1 connection, parsed by httptools), `transport`
(the one httpx transport: pooled connections, the body as it arrives), `wire` (request bodies
and the NDJSON stream, sans I/O), `errors` (every failure to one `SluiceError`), `guard` (first
token and idle timeouts), `pool` (which base URL a request goes to), `health` (reachability and
the model list, the ``ollama/`` prefix) and `backend` (the `Generator` and `Embedder` on top).

Import the modules themselves (``from server.backends.ollama.backend import OllamaBackend``);
this package object re-exports nothing, so importing a light module (the wire codec, health)
does not pull in the transports.
"""
