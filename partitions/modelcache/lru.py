"""Which cached models to evict to make room: least recently used first, and never one a
running (or starting) pod uses, since its `MODEL_DIR` would vanish under it. Pure: entries,
the keys in use and the bytes wanted in, the keys to remove out (None: no way to fit)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    key: str
    uri: str
    size: int
    last_used: float


def evictions(entries: Iterable[Entry], *, in_use: set[str], need: int, capacity: int,
              reserved: int = 0) -> list[str] | None:
    """The keys to evict, oldest use first, so that `need` more bytes fit in `capacity`
    beside what stays and the `reserved` bytes of downloads under way; None when even
    evicting every unused model would not make room."""
    entries = list(entries)
    used = sum(e.size for e in entries) + reserved
    if used + need <= capacity:
        return []
    out: list[str] = []
    for e in sorted(entries, key=lambda e: (e.last_used, e.key)):
        if e.key in in_use:
            continue
        out.append(e.key)
        used -= e.size
        if used + need <= capacity:
            return out
    return None
