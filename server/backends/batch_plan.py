"""Which queued items make up the next forward pass: length buckets under a padded-token cap.

A forward pass pads every row to its longest, so its cost is ``rows x longest`` padded tokens plus a
fixed cost per pass. `Buckets` keeps the queued items grouped by length class (items shorter than
``FLOOR`` share one class, then one class per power of two) in arrival order, and `Buckets.take`
plans one pass: it starts with the bucket of the oldest item (so nothing starves), fills it in
arrival order under the caps, then merges a neighbouring bucket only when the padding that adds
costs less than the pass it saves (``pass_overhead_tokens``). Rows never exceed ``max_rows`` and
padded tokens never exceed ``max_tokens``, except that a single item longer than the cap still runs
(alone).

This module is pure bookkeeping: no threads, no locks, no model library. Its caller holds the lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["FLOOR", "Buckets", "Slot", "length_class"]

P = TypeVar("P")

# Lengths below this share one bucket: for short texts the fixed cost of a pass outweighs padding.
FLOOR = 16


def length_class(length: int) -> int:
    """The bucket of an item ``length`` tokens long: 0 below `FLOOR`, then one per power of two."""
    if length < FLOOR:
        return 0
    return length.bit_length() - FLOOR.bit_length() + 1


@dataclass(slots=True)
class Slot(Generic[P]):
    """One queued item: its request (``owner``), index in that request, length and arrival order."""

    owner: P
    index: int
    length: int
    seq: int


class Buckets(Generic[P]):
    """Queued slots by length class. ``alive(owner)`` says whether a slot still needs to run."""

    def __init__(self, *, max_rows: int, max_tokens: int, pass_overhead_tokens: int) -> None:
        if max_rows < 1 or max_tokens < 1 or pass_overhead_tokens < 0:
            raise ValueError("max_rows and max_tokens must be >= 1, pass_overhead_tokens >= 0")
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.pass_overhead_tokens = pass_overhead_tokens
        self._by_class: dict[int, deque[Slot[P]]] = {}
        self._seq = 0

    def add(self, owner: P, lengths: list[int]) -> None:
        """Queue one slot per item of ``owner``, in order."""
        for index, length in enumerate(lengths):
            slot = Slot(owner, index, max(1, length), self._seq)
            self._seq += 1
            self._by_class.setdefault(length_class(slot.length), deque()).append(slot)

    def owners(self) -> list[P]:
        """Every request with a queued slot (each once, in no particular order)."""
        seen: dict[int, P] = {}
        for slots in self._by_class.values():
            for slot in slots:
                seen.setdefault(id(slot.owner), slot.owner)
        return list(seen.values())

    def clear(self) -> None:
        self._by_class.clear()

    def take(self, alive: Callable[[P], bool]) -> list[Slot[P]]:
        """Remove and return the next pass (empty when nothing alive is queued)."""
        heads: dict[int, Slot[P]] = {}
        for key in list(self._by_class):
            slots = self._by_class[key]
            while slots and not alive(slots[0].owner):
                slots.popleft()
            if slots:
                heads[key] = slots[0]
            else:
                del self._by_class[key]
        if not heads:
            return []
        anchor = min(heads, key=lambda key: heads[key].seq)
        chosen = self._fill(anchor, [], 0, alive)
        longest = max(slot.length for slot in chosen)
        # Nearest classes first: they add the least padding.
        for key in sorted(heads, key=lambda key: (abs(key - anchor), key)):
            if key == anchor or len(chosen) >= self.max_rows:
                continue
            extra = self._peek(key, len(chosen), longest, alive)
            if not extra:
                continue
            merged_longest = max(longest, max(slot.length for slot in extra))
            merged = (len(chosen) + len(extra)) * merged_longest
            apart = len(chosen) * longest + len(extra) * max(slot.length for slot in extra)
            if merged <= apart + self.pass_overhead_tokens:
                chosen = self._fill(key, chosen, merged_longest, alive)
                longest = merged_longest
        return chosen

    def _peek(self, key: int, rows: int, longest: int, alive: Callable[[P], bool]) -> list[Slot[P]]:
        """The slots of class ``key`` that would fit beside ``rows`` rows of ``longest`` tokens."""
        out: list[Slot[P]] = []
        for slot in self._by_class[key]:
            if not alive(slot.owner):
                continue
            width = max(longest, slot.length)
            if rows + len(out) + 1 > self.max_rows or (rows + len(out) + 1) * width > self.max_tokens:
                break
            longest = width
            out.append(slot)
        return out

    def _fill(
        self, key: int, chosen: list[Slot[P]], longest: int, alive: Callable[[P], bool]
    ) -> list[Slot[P]]:
        slots = self._by_class[key]
        while slots and len(chosen) < self.max_rows:
            slot = slots[0]
            if not alive(slot.owner):
                slots.popleft()
                continue
            width = max(longest, slot.length)
            if chosen and (len(chosen) + 1) * width > self.max_tokens:
                break
            slots.popleft()
            chosen.append(slot)
            longest = width
        if not slots:
            del self._by_class[key]
        return chosen
