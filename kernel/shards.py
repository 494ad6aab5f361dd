"""Service shards: `scale` and `route` split services by `shard_of(name)` (a stable hash, the
same in every process, mod a fixed count), and the coordinator hands shards to instances with
epochs, as it hands node partitions to `schedule`. Whoever receives a sharded function's
action (`schedule` a placement, a node a stop, `route` a mode, an activator an endpoint set)
keeps a `ShardFence` on the map and refuses an epoch older than the shard's current one: a
stale owner's actions never land, whatever it believes."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field

from kernel.messages import ShardMap
from kernel.versions import plausible

log = logging.getLogger(__name__)

# Fixed, so a service's shard never changes while instances come and go; far more shards
# than instances, so they spread evenly.
SHARDS = 64
SHARDED = ("scale", "route")


def shard_of(service: str, count: int = SHARDS) -> int:
    """Not Python's `hash`: that is salted per process."""
    return zlib.crc32(service.encode()) % count


@dataclass
class ShardFence:
    version: int = 0
    count: int = SHARDS
    epochs: dict[str, list[int]] = field(default_factory=dict)  # kind → epoch by shard id

    def apply(self, smap: ShardMap) -> bool:
        """Take a newer map; False when it is not (older, or implausibly far ahead)."""
        if smap.version <= self.version:
            return False
        if not plausible(self.version, smap.version):
            log.error("shard map v%d refused: implausible after v%d", smap.version,
                      self.version)
            return False
        self.version, self.count = smap.version, smap.count
        self.epochs = {kind: [s.epoch for s in sorted(shards, key=lambda s: s.id)]
                       for kind, shards in smap.shards.items()}
        return True

    def epoch(self, kind: str, service: str) -> int:
        epochs = self.epochs.get(kind)
        if not epochs:
            return 0
        return epochs[shard_of(service, self.count) % len(epochs)]

    def check(self, kind: str, service: str, epoch: int) -> str | None:
        """None when an action of `kind` on `service` from `epoch` may proceed, else why
        not. Before any map (start-up) nothing is known to be stale."""
        current = self.epoch(kind, service)
        if epoch < current:
            return (f"stale {kind} epoch {epoch} for shard {shard_of(service, self.count)} "
                    f"of {service!r} (current {current})")
        return None
