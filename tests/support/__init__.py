"""Helpers shared by the test suites: the Ollama emulator, the server runner."""
