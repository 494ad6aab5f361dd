"""Fencing at the node: a node starts a pod only for the current owner of its partition.

When the coordinator reassigns a partition (its owner missed heartbeats), the old owner may
still be running and still believe it owns the nodes. Every StartPod carries the partition and
epoch its sender owns; a node that knows a newer epoch for its partition refuses, so a stale
owner's commits never land, whatever it believes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel.messages import PartitionMap, StartPod


@dataclass
class EpochFence:
    version: int = 0
    owner_of: dict[str, tuple[int, int]] = field(default_factory=dict)  # node → (pid, epoch)

    def apply(self, pmap: PartitionMap) -> None:
        if pmap.version <= self.version:
            return
        self.version = pmap.version
        self.owner_of = {n: (p.id, p.epoch) for p in pmap.partitions for n in p.nodes}

    def check(self, start: StartPod) -> str | None:
        """None when the start may proceed, else why it is refused."""
        known = self.owner_of.get(start.node)
        if known is None or start.partition < 0:
            # No map yet (start-up) or an unpartitioned caller (a baseline scheduler).
            return None
        pid, epoch = known
        if start.partition != pid:
            return f"node {start.node} is in partition {pid}, not {start.partition}"
        if start.epoch < epoch:
            return f"stale epoch {start.epoch} for partition {pid} (current {epoch})"
        return None
