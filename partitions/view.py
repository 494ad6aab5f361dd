"""Placement inside one partition: the pure decision of the `schedule` control function.

Scoring, in order:
1. cold-start locality — a node that already caches the service's model weights wins,
   because loading weights dominates an inference cold start;
2. best fit — among those, the node left with the least free cpu (then memory) after the
   pod, so large free slots stay whole for large pods and the partition's "largest free
   slot" in the probe cache stays meaningful;
3. name, so equal cases decide the same way every time (tests and replays).

Because the owner is the only writer of its nodes, it can keep them in an index ordered by
free capacity (all nodes, and the nodes caching each model) and find the best fit by bisection
instead of scoring every node: `choose` and the exhaustive `scan` give the same node (a
property test checks it). The `central` baseline uses `scan`, as kube-scheduler filters and
scores every node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from kernel.messages import (
    Inventory,
    NodeInfo,
    PartitionSummary,
    PodEvent,
    Resources,
    Toleration,
)
from partitions.nodes import NodeState
from partitions.tolerations import describe, untolerated

Key = tuple[float, int, int, str]  # free cpu, free memory, free gpu, name


def _key(node: NodeState) -> Key:
    f = node.free
    return (f.cpu, f.memory_mb, f.gpu, node.name)


@dataclass
class PartitionView:
    """The authoritative accounting of the nodes one instance owns, at one epoch."""

    partition: int = -1
    epoch: int = 0
    nodes: dict[str, NodeState] = field(default_factory=dict)
    pods: dict[str, str] = field(default_factory=dict)  # pod → node
    indexed: bool = True
    # Off: a node caching the model gets no preference (the cold-start benchmark's same-run
    # comparison, loadtests/coldstart.py); best fit alone decides.
    locality: bool = True
    _all: SortedList = field(default_factory=SortedList)
    _by_model: dict[str, SortedList] = field(default_factory=dict)
    _keys: dict[str, Key] = field(default_factory=dict)
    _free_total: Resources = Resources()
    # Nodes whose running pods we have not heard yet: never chosen until they answer.
    held: set[str] = field(default_factory=set)

    def assign(self, partition: int, epoch: int, infos: list[NodeInfo]) -> None:
        """Adopt a (new) assignment, keeping the accounting of nodes we already owned."""
        keep = {n.name: self.nodes[n.name] for n in infos if n.name in self.nodes}
        for info in infos:
            state = keep.get(info.name)
            if state is not None and state.info != info:
                # Re-registered (new capacity, labels, cached models): same accounting.
                # Models a real cache reports (`model_bytes`) follow it, evictions too;
                # the others (labels, models pods were seen loading) only accumulate.
                gone = set(state.info.model_bytes) - set(info.model_bytes)
                state.info = info
                state.models = (state.models - gone) | set(info.models)
        self.nodes = {n.name: keep.get(n.name) or NodeState(n) for n in infos}
        self.pods = {p: n for p, n in self.pods.items() if n in self.nodes}
        self.partition, self.epoch = partition, epoch
        self._reindex()

    # ---- the index -----------------------------------------------------------------------

    def _reindex(self) -> None:
        self._all = SortedList()
        self._by_model = {}
        self._keys = {}
        self._free_total = Resources()
        self.held &= set(self.nodes)
        for node in self.nodes.values():
            if node.name not in self.held:
                self._insert(node)

    def hold(self, names: set[str]) -> None:
        for name in names & set(self.nodes) - self.held:
            self._remove(self.nodes[name])
            self.held.add(name)

    def unhold(self, name: str) -> None:
        if name in self.held and name in self.nodes:
            self.held.discard(name)
            self._insert(self.nodes[name])

    def _insert(self, node: NodeState) -> None:
        key = _key(node)
        self._keys[node.name] = key
        self._all.add(key)
        for model in node.models:
            self._by_model.setdefault(model, SortedList()).add(key)
        self._free_total = self._free_total + node.free

    def _remove(self, node: NodeState) -> None:
        key = self._keys.pop(node.name)
        self._all.remove(key)
        for model in node.models:
            self._by_model[model].remove(key)
        self._free_total = self._free_total - node.free

    def _changed(self, node: NodeState, change) -> None:
        """Apply a change to a node's accounting and keep the index in step with it."""
        if node.name in self.held:
            change()
            return
        self._remove(node)
        try:
            change()
        finally:
            self._insert(node)

    # ---- choosing ------------------------------------------------------------------------

    def choose(self, req: Resources, model: str, *,
               tolerations: Sequence[Toleration] = ()) -> NodeState | None:
        if not self.indexed:
            return self.scan(req, model, tolerations=tolerations)
        first = self._by_model.get(model) if self.locality else None
        for keys in (first, self._all):
            if keys:
                node = self._best_fit(keys, req, tolerations)
                if node is not None:
                    return node
        return None

    def _best_fit(self, keys: SortedList, req: Resources,
                  tolerations: Sequence[Toleration] = ()) -> NodeState | None:
        """The first node by (free cpu, free memory, ...) at or above the request that also
        fits in memory and gpu, and whose taints the pod tolerates: the least left over,
        as the scan's score has it."""
        for key in keys.irange(minimum=(req.cpu - 1e-9,)):
            if key[1] >= req.memory_mb and key[2] >= req.gpu:
                node = self.nodes[key[3]]
                if admits(node, tolerations):
                    return node
        return None

    def scan(self, req: Resources, model: str, *,
             tolerations: Sequence[Toleration] = ()) -> NodeState | None:
        """Filter and score every node (what a central scheduler does each time)."""
        best: NodeState | None = None
        best_key: tuple[int, float, int, int, str] | None = None
        for node in self.nodes.values():
            if node.name in self.held or not node.fits(req) or not admits(node, tolerations):
                continue
            left = node.free - req
            cached = self.locality and model in node.models
            key = (0 if cached else 1, left.cpu, left.memory_mb, left.gpu, node.name)
            if best_key is None or key < best_key:
                best, best_key = node, key
        return best

    # ---- committing ----------------------------------------------------------------------

    def place(self, pod: str, req: Resources, model: str, *,
              tolerations: Sequence[Toleration] = ()) -> NodeState | None:
        """Choose and commit in one step: the owner is the only writer, so this is atomic."""
        if pod in self.pods:
            return self.nodes[self.pods[pod]]
        node = self.choose(req, model, tolerations=tolerations)
        if node is None:
            return None
        self._changed(node, lambda: node.commit(pod, req))
        self.pods[pod] = node.name
        return node

    def commit_on(self, pod: str, node_name: str, req: Resources) -> bool:
        if pod in self.pods:  # idempotent, as place(): never the same pod on two nodes
            return self.pods[pod] == node_name
        node = self.nodes.get(node_name)
        if node is None or not node.fits(req):
            return False
        self._changed(node, lambda: node.commit(pod, req))
        self.pods[pod] = node_name
        return True

    def record(self, pod: str, node_name: str, req: Resources, *,
               devices: Sequence[int] = ()) -> None:
        """A pod a node already runs (adopted with a partition): counted even if the node
        looks full, since refusing would not stop the pod, only blind us to it. Its GPU
        devices are those its node reports, so no new pod is given them."""
        node = self.nodes.get(node_name)
        if node is None or pod in self.pods:
            return

        def add() -> None:
            node.committed[pod] = req
            node.used = node.used + req
            node.take_devices(pod, req.gpu, tuple(devices))

        self._changed(node, add)
        self.pods[pod] = node_name

    def record_inventory(self, answer: Inventory) -> None:
        """What nodes reported they run, as `record` for each pod."""
        for node, pods in answer.pods.items():
            for alloc in pods:
                self.record(alloc.pod, node, alloc.resources, devices=alloc.gpu_devices)

    def apply_pod_event(self, ev: PodEvent) -> None:
        """A pod that ended gives its resources back; a ready one tells what its node caches."""
        if ev.state in ("stopped", "failed"):
            self.release(ev.pod)
        elif ev.state == "ready" and "://" not in ev.model:
            # A model fetched by storage URI is known from the node's cache report, which
            # also says when it is evicted; a pod's word for it would outlive the eviction.
            self.note_model(ev.node, ev.model or ev.service)

    def release(self, pod: str) -> bool:
        name = self.pods.pop(pod, None)
        if name is None or name not in self.nodes:
            return False
        node = self.nodes[name]
        released: list[bool] = []
        self._changed(node, lambda: released.append(node.release(pod)))
        return released[0]

    def note_model(self, node_name: str, model: str) -> None:
        node = self.nodes.get(node_name)
        if node is not None and model not in node.models:
            self._changed(node, lambda: node.models.add(model))

    def shut_out(self, tolerations: Sequence[Toleration]) -> dict[str, str]:
        """Node → the taint that keeps a pod with these tolerations off it: for the reason
        an unschedulable pod is given (a full partition and a tainted one read the same
        otherwise)."""
        out: dict[str, str] = {}
        for node in self.nodes.values():
            if node.info.taints and (t := untolerated(node.info.taints, tolerations)):
                out[node.name] = describe(t)
        return out

    # ---- what others see -----------------------------------------------------------------

    def free(self) -> dict[str, Resources]:
        return {name: n.free for name, n in self.nodes.items()}

    def summary(self, owner: str, *, serving: bool = True) -> PartitionSummary:
        """What other instances' probe caches need: total free, and the largest free slot
        (the node with the most free cpu, then memory). O(1): read off the index."""
        largest = Resources()
        if self._all:
            cpu, mem, gpu, _ = self._all[-1]
            largest = Resources(cpu=cpu, memory_mb=mem, gpu=gpu)
        return PartitionSummary(
            partition=self.partition,
            epoch=self.epoch,
            owner=owner,
            free=self._free_total,
            largest_free=largest,
            nodes=len(self.nodes),
            serving=serving,
        )


def admits(node: NodeState, tolerations: Sequence[Toleration]) -> bool:
    """The node's taints let a pod with these tolerations on (most nodes have none)."""
    return not node.info.taints or untolerated(node.info.taints, tolerations) is None


def inventoried(answers: list[object]) -> set[str]:
    """The nodes a set of inventory answers covers (a backend may answer for many at once)."""
    return {node for a in answers if isinstance(a, Inventory) for node in a.pods}
