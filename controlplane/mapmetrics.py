"""The coordinator's metrics: partition and shard ownership changes with their epochs, map
versions, and live instances per control function. Computed from the old and the new map
when one is published (never per heartbeat), so the coordinator's loop stays as it was."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from kernel.messages import Heartbeat, PartitionMap, ShardMap
from kernel.metrics import Metrics


class MapMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._map_changes = metrics.counter("fnplane.partition.map.changes")
        self._map_version = metrics.gauge("fnplane.partition.map.version")
        self._owner_changes = metrics.counter("fnplane.partition.ownership.changes")
        self._epoch = metrics.gauge("fnplane.partition.epoch")
        self._shard_changes = metrics.counter("fnplane.shard.ownership.changes")
        self._shard_version = metrics.gauge("fnplane.shard.map.version")
        self._instances = metrics.gauge("fnplane.instances")
        self._shown_instances: dict[str, int] = {}
        self._map_changes.add(0)  # from 0, so the first change is in a rate

    def partition_map(self, old: PartitionMap, new: PartitionMap) -> None:
        self._map_changes.add(1)
        self._map_version.set(new.version)
        before = {p.id: p.owner for p in old.partitions}
        for p in new.partitions:
            attrs = {"partition": str(p.id)}
            self._epoch.set(p.epoch, attrs)
            if before.get(p.id) != p.owner:
                self._owner_changes.add(1, attrs)

    def shard_map(self, old: ShardMap, new: ShardMap) -> None:
        self._shard_version.set(new.version)
        for kind, shards in new.shards.items():
            before = {s.id: s.owner for s in old.shards.get(kind, [])}
            moved = sum(1 for s in shards if before.get(s.id) != s.owner)
            if moved:
                self._shard_changes.add(moved, {"kind": kind})

    def instances(self, beats: Iterable[Heartbeat]) -> None:
        """Live instances per kind; set only when a count changes (once per tick at most)."""
        counts = Counter(b.kind for b in beats)
        for kind in set(counts) | set(self._shown_instances):
            n = counts.get(kind, 0)
            if self._shown_instances.get(kind) != n:
                self._shown_instances[kind] = n
                self._instances.set(n, {"kind": kind})
