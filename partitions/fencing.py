"""Fencing at the node: a node starts a pod only for the current owner of its partition.

When the coordinator reassigns a partition (its owner missed heartbeats), the old owner may
still be running and still believe it owns the nodes. Every StartPod carries the partition and
epoch its sender owns; a node that knows a newer epoch for its partition refuses, so a stale
owner's commits never land, whatever it believes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kernel.errors import ErrorCode, RemoteError
from kernel.messages import PartitionMap, StartPod
from kernel.versions import plausible

log = logging.getLogger(__name__)

# The pod-events partition token of a node that is in no partition yet (its owner, once there
# is one, adopts the node from its inventory and so misses nothing that was said here).
NO_PARTITION = "none"


@dataclass
class EpochFence:
    version: int = 0
    owner_of: dict[str, tuple[int, int]] = field(default_factory=dict)  # node → (pid, epoch)
    # Starts that name no partition come only from the scheduler benchmark's baselines, which
    # own no partition; only a node agent configured for them (the benchmark's sim) takes them.
    allow_unpartitioned: bool = False

    def apply(self, pmap: PartitionMap) -> None:
        if pmap.version <= self.version:
            return
        if not plausible(self.version, pmap.version):
            log.error("partition map v%d refused: implausible after v%d", pmap.version,
                      self.version)
            return
        self.version = pmap.version
        self.owner_of = {n: (p.id, p.epoch) for p in pmap.partitions for n in p.nodes}

    def check(self, start: StartPod) -> str | None:
        """None when the start may proceed, else why it is refused."""
        if start.partition < 0:
            if self.allow_unpartitioned:
                return None
            return (f"StartPod for {start.node} names no partition: refused (only the owner "
                    f"of the node's partition starts pods here)")
        known = self.owner_of.get(start.node)
        if known is None:
            return None  # no map yet (start-up): the sender's epoch is checked once one is
        pid, epoch = known
        if start.partition != pid:
            return f"node {start.node} is in partition {pid}, not {start.partition}"
        if start.epoch < epoch:
            return f"stale epoch {start.epoch} for partition {pid} (current {epoch})"
        return None

    def event_partition(self, node: str) -> str:
        """The partition token a pod event of `node` is published under: the owner of the
        node's partition listens there and nowhere else."""
        known = self.owner_of.get(node)
        return str(known[0]) if known is not None else NO_PARTITION

    def refusal(self, start: StartPod) -> RemoteError | None:
        """The error a node answers a refused start with: a start that names no partition
        is invalid; one from a stale or wrong owner says the sender's map is behind."""
        why = self.check(start)
        if why is None:
            return None
        return RemoteError(ErrorCode.INVALID if start.partition < 0 else ErrorCode.STALE_EPOCH,
                           why)
