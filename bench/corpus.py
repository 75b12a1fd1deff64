"""The texts every embedding benchmark sends: fixed, identical for every target, in two corpora.

- `texts` (the corpus, ``"mixed"``): sentences of 8 to 32 words, so lengths vary by 4x.
- `short_texts` (``"short"``): short uniform sentences of 12 to 20 words, like a notebook or a
  search box sends: little padding to save, so batching has to win by itself.

Both are drawn with a fixed seed, so the raw limit, the seed service, infinity-emb and sluice all
encode exactly the same inputs in every run. `CORPORA` maps each name to its function.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["CORPORA", "short_texts", "texts"]

_WORDS = (
    "stream token session socket model embedding vector batch queue latency server client browser "
    "proxy notebook resume replay event log request response cancel delta done error limit memory "
    "thread worker cache sentence language question answer summary river bridge mountain forest "
    "morning evening coffee window garden library museum station market harbour winter summer "
    "quickly slowly carefully often never always together alone bright quiet gentle heavy small "
    "large ancient modern simple complex useful strange happy tired curious patient honest"
).split()

_SUBJECTS = (
    "the old librarian",
    "a tired engineer",
    "my younger sister",
    "the night train",
    "our small team",
    "the city council",
    "a curious student",
    "the harbour master",
    "her patient doctor",
    "the new app",
)
_VERBS = (
    "carefully explained",
    "quietly repaired",
    "finally approved",
    "slowly rebuilt",
    "often visited",
    "never questioned",
    "happily shared",
    "briefly described",
    "loudly praised",
    "gently moved",
)
_OBJECTS = (
    "the broken bridge",
    "a simple summary",
    "the winter market",
    "every request",
    "the museum roof",
    "a short question",
    "the garden path",
    "the cache layer",
    "an honest answer",
    "the river map",
)
_TAILS = (
    "before the morning meeting",
    "after a long and quiet evening",
    "with help from two neighbours",
    "during the heavy summer storm",
    "while everyone else was asleep",
    "for the third time this week",
    "without asking anyone for permission",
    "in front of the whole station",
    "at the edge of the forest",
    "because the old one had failed",
    "as the last train left the city",
    "under a bright and cold sky",
)


def texts(count: int, seed: int = 8) -> list[str]:
    """The mixed corpus: random words, 8 to 32 of them per sentence."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.choices(_WORDS, k=rng.randint(8, 32))
        out.append(" ".join(words).capitalize() + ".")
    return out


def short_texts(count: int, seed: int = 20) -> list[str]:
    """The short corpus: plain sentences of 12 to 20 words (subject, verb, object, one or two tails)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        tails = rng.sample(_TAILS, rng.randint(1, 2))
        words = " ".join([rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), *tails]).split()
        if 12 <= len(words) <= 20:  # others are drawn again
            out.append(" ".join(words).capitalize() + ".")
    return out


CORPORA: dict[str, Callable[[int], list[str]]] = {"mixed": texts, "short": short_texts}
