"""The Ollama backend: the HTTP relay to one or more Ollama servers (wire format in OLLAMA.md).

Import the modules themselves (``from server.backends.ollama.backend import OllamaBackend``);
this package object re-exports nothing, so importing a light module (the wire codec) does not
pull in the transports.
"""
