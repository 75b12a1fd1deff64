"""The texts every embedding benchmark sends: fixed, varied in length, identical for every target.

Sentences of 8 to 32 words drawn with a fixed seed, so the raw limit, the seed service,
infinity-emb and sluice all encode exactly the same inputs in every run.
"""

from __future__ import annotations

import random

__all__ = ["texts"]

_WORDS = (
    "stream token session socket model embedding vector batch queue latency server client browser "
    "proxy notebook resume replay event log request response cancel delta done error limit memory "
    "thread worker cache sentence language question answer summary river bridge mountain forest "
    "morning evening coffee window garden library museum station market harbour winter summer "
    "quickly slowly carefully often never always together alone bright quiet gentle heavy small "
    "large ancient modern simple complex useful strange happy tired curious patient honest"
).split()


def texts(count: int, seed: int = 8) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.choices(_WORDS, k=rng.randint(8, 32))
        out.append(" ".join(words).capitalize() + ".")
    return out
