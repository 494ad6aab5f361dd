"""What one `schedule` instance believes about the other partitions' free capacity.

Each entry is a summary the partition's owner sent (piggybacked on every reserve reply, and
broadcast at a low rate), with the time it arrived. Entries older than the TTL are not
trusted: they are dropped rather than used, so a cross-partition probe goes only where a
recent summary says the pod fits. The clock is injected so tests move time without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kernel.messages import PartitionSummary, Resources


@dataclass
class ProbeCache:
    ttl_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    entries: dict[int, tuple[PartitionSummary, float]] = field(default_factory=dict)

    def update(self, summary: PartitionSummary) -> None:
        """Newer epochs win; within an epoch, the latest summary wins."""
        old = self.entries.get(summary.partition)
        if old is not None and old[0].epoch > summary.epoch:
            return
        self.entries[summary.partition] = (summary, self.clock())

    def forget(self, partition: int) -> None:
        self.entries.pop(partition, None)

    def fresh(self) -> list[PartitionSummary]:
        now = self.clock()
        for pid, (_, seen) in list(self.entries.items()):
            if now - seen > self.ttl_s:
                del self.entries[pid]
        return [s for s, _ in self.entries.values()]

    def unknown(self, owned: dict[int, int], *, exclude: int) -> list[tuple[int, int]]:
        """(partition, epoch) of the owned partitions we hold no fresh summary of, lowest id
        first: probed last, when no summary says a pod fits. Knowing nothing of a partition
        (we just started, its owner is new, its summaries were lost) is not knowing it full."""
        known = {s.partition for s in self.fresh()}
        return sorted((p, e) for p, e in owned.items() if p != exclude and p not in known)

    def age(self, partition: int) -> float | None:
        entry = self.entries.get(partition)
        return None if entry is None else self.clock() - entry[1]

    def candidates(self, req: Resources, *, exclude: int,
                   serving: bool = False) -> list[PartitionSummary]:
        """Partitions whose largest free slot fits the pod, most promising first: the most
        free cpu left overall, so a probe is likely to succeed and load spreads. `serving`:
        only those whose owner takes placements from the queue group."""
        fits = [
            s for s in self.fresh()
            if s.partition != exclude and s.owner and req.fits_in(s.largest_free)
            and (s.serving or not serving)
        ]
        return sorted(fits, key=lambda s: (-s.free.cpu, -s.free.memory_mb, s.partition))
