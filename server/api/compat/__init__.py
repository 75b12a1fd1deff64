"""The compatible HTTP APIs: each speaks another server's wire format over sluice's dispatcher.

`seed` (the seed article's ``/api/v1/*``), `openai` (``/v1/chat/completions``, ``/v1/embeddings``,
``/v1/models``) and `ollama` (Ollama's own ``/api/*``, for the `ollama` package and the tools built
on it; not to be confused with `server.backends.ollama`, which is the client of a real Ollama).
"""
