"""Resume across forced disconnects, bounded for ``make test``: 200 cuts over WS, 200 over SSE,
and 100 with the session moving between the two (``bench/soak.py`` runs the full 1,000).

Each run streams generations on one session while the client resets its TCP connection after a
random number of events (sometimes none: the cut lands in the replay) and resumes; the text of
every generation must equal the emulator's exactly, seq must be gap-free and never repeated, and
every resume must find the session (`tests.reliability.resume`).
"""

from __future__ import annotations

import pytest

from tests.reliability.resume import SoakConfig, run_soak
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

# 400 pieces/s per stream, 600 pieces per generation: ~1.5 s each, two in flight at once, so the
# cuts land mid-stream, between generations and across their ends.
PACE = {"token_rate": 400.0, "tokens": 600}
DISCONNECTS = {"ws": 200, "sse": 200, "mixed": 100}


@pytest.mark.parametrize("transport", ["ws", "sse", "mixed"])
async def test_resume_across_forced_disconnects_loses_and_repeats_nothing(
    transport: str, server: ServerProcess, emu: Emulator, has_sse: bool
) -> None:
    if transport != "ws" and not has_sse:
        pytest.skip("the SSE session endpoints (POST /v1/sessions) are not served yet")
    emu.configure(**PACE)
    config = SoakConfig(transport=transport, disconnects=DISCONNECTS[transport], seed=7, time_limit_s=60)  # type: ignore[arg-type]
    result = await run_soak(config, base_url=server.url, emulator=emu)
    print("\n" + result.summary())
    assert not result.stopped_early, result.summary()
    assert result.disconnects == DISCONNECTS[transport]
    assert result.generations >= 3
    assert result.cuts_in_replay > 0
    if transport == "mixed":
        assert result.resumes["ws"] > 0 and result.resumes["sse"] > 0
