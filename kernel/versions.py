"""Plausible versions. Partition maps and endpoint sets carry versions that grow by one per
change, and every reader ignores what is older than what it has — so one message with an
absurd version (10^9, from a bug or from someone holding a sender's credentials) would make
it ignore every real update after it, for good. A reader refuses, and logs, a version that
jumps further ahead than any real sequence of changes could have taken it."""

from __future__ import annotations

# More changes than one reader can have missed (a map changes when an instance or a node
# comes or goes; an endpoint set when a pod does), yet far below any absurd value.
MAX_JUMP = 100_000


def plausible(current: int, new: int) -> bool:
    """`new` may follow `current`. With nothing seen yet (0) there is nothing to judge by:
    readers take their first version from an answer they asked for, not a broadcast."""
    return current <= 0 or new - current <= MAX_JUMP
