"""Placement inside one partition: the pure decision of the `schedule` control function.

Scoring, in order:
1. cold-start locality — a node that already caches the service's model weights wins,
   because loading weights dominates an inference cold start;
2. best fit — among those, the node left with the least free cpu (then memory) after the
   pod, so large free slots stay whole for large pods and the partition's "largest free
   slot" in the probe cache stays meaningful;
3. name, so equal cases decide the same way every time (tests and replays).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.schemas import NodeInfo, PartitionSummary, Resources
from partitions.nodes import NodeState


@dataclass
class PartitionView:
    """The authoritative accounting of the nodes one instance owns, at one epoch."""

    partition: int = -1
    epoch: int = 0
    nodes: dict[str, NodeState] = field(default_factory=dict)
    pods: dict[str, str] = field(default_factory=dict)  # pod → node

    def assign(self, partition: int, epoch: int, infos: list[NodeInfo]) -> None:
        """Adopt a (new) assignment, keeping the accounting of nodes we already owned."""
        keep = {n.name: self.nodes[n.name] for n in infos if n.name in self.nodes}
        for info in infos:
            state = keep.get(info.name)
            if state is not None and state.info != info:
                # Re-registered (new capacity, labels, cached models): same accounting.
                state.info = info
                state.models |= set(info.models)
        self.nodes = {n.name: keep.get(n.name) or NodeState(n) for n in infos}
        self.pods = {p: n for p, n in self.pods.items() if n in self.nodes}
        self.partition, self.epoch = partition, epoch

    def choose(self, req: Resources, model: str) -> NodeState | None:
        best: NodeState | None = None
        best_key: tuple[int, float, int, str] | None = None
        for node in self.nodes.values():
            if not node.fits(req):
                continue
            left = node.free - req
            key = (0 if model in node.models else 1, left.cpu, left.memory_mb, node.name)
            if best_key is None or key < best_key:
                best, best_key = node, key
        return best

    def place(self, pod: str, req: Resources, model: str) -> NodeState | None:
        """Choose and commit in one step: the owner is the only writer, so this is atomic."""
        if pod in self.pods:
            return self.nodes[self.pods[pod]]
        node = self.choose(req, model)
        if node is None:
            return None
        node.commit(pod, req)
        self.pods[pod] = node.name
        return node

    def commit_on(self, pod: str, node_name: str, req: Resources) -> bool:
        if pod in self.pods:  # idempotent, as place(): never the same pod on two nodes
            return self.pods[pod] == node_name
        node = self.nodes.get(node_name)
        if node is None or not node.fits(req):
            return False
        node.commit(pod, req)
        self.pods[pod] = node_name
        return True

    def release(self, pod: str) -> bool:
        node = self.pods.pop(pod, None)
        if node is None or node not in self.nodes:
            return False
        return self.nodes[node].release(pod)

    def note_model(self, node_name: str, model: str) -> None:
        if node_name in self.nodes:
            self.nodes[node_name].models.add(model)

    def free(self) -> dict[str, Resources]:
        return {name: n.free for name, n in self.nodes.items()}

    def summary(self, owner: str) -> PartitionSummary:
        """What other instances' probe caches need: total free, and the largest free slot."""
        total = Resources()
        largest = Resources()
        for node in self.nodes.values():
            free = node.free
            total = total + free
            if (free.cpu, free.memory_mb) > (largest.cpu, largest.memory_mb):
                largest = free
        return PartitionSummary(self.partition, self.epoch, owner, total, largest, len(self.nodes))
