"""Constants the client tests share (kept out of conftest.py, which pytest imports by itself)."""

from sluice_client import Backoff

# Reconnects in tests: quick, and giving up quickly when a test wants them to.
FAST = Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=3.0)
# The emulator's model the real server generates with, so every text is known in advance.
REAL_MODEL = "llama3.2:1b"
