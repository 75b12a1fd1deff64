"""The SSE transport's tests run against the same kind of real server as the HTTP API tests."""

from tests.api.conftest import base_url, emulator, paced, server

__all__ = ["base_url", "emulator", "paced", "server"]
