"""The two schedulers the partitioned `schedule` function is measured against (DESIGN.md,
Baselines), run on the same simulator, the same NATS server and the same requests.

- `CentralScheduler`: one instance with the authoritative view of *every* node, in one of three
  strategies (the benchmark runs all of them, so the partitioned design is measured against the
  strongest central one, not only the weakest):
  `scan` filters and scores every node (the full-scan `central` baseline); `indexed` uses the
  very free-capacity index of `PartitionView` over the whole cluster (`central-indexed`: the
  strongest central design); `kube` filters nodes from a rotating start until kube-scheduler's
  `percentageOfNodesToScore` of them are feasible, then scores only those (`kube-scheduler`).
- `SamplingScheduler`: Sparrow-like power of two choices. No view, no partitions: per placement
  it probes d random nodes able to hold the pod at all (Sparrow's per-task constraints), starts
  the pod on the better one, and lets the node refuse when a concurrent placement took the room
  first (the node is the only authority); then it tries new random nodes, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.errors import RemoteError
from kernel.messages import (
    Empty,
    Inventory,
    InventoryRequest,
    NodeFree,
    NodeInfo,
    PartitionMap,
    Placement,
    PlaceRequest,
    PodEvent,
    Resources,
    StartPod,
    Unschedulable,
)
from partitions.nodes import NodeState
from partitions.view import PartitionView, inventoried

log = logging.getLogger(__name__)

START_TIMEOUT_S = 5.0
ADOPT_TIMEOUT_S = 10.0


class _NodeListFollower(Component):
    """Both baselines learn the node set from the coordinator's partition map (they ignore
    its partitions): fetched at start, then followed on every change."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self._known = asyncio.Event()
        self._map_version = 0

    async def _follow_map(self) -> None:
        await self.bus.serve(ep.PARTITION_MAP, self._on_map)
        self.tasks.spawn(self._fetch_map(), name="map")

    async def _fetch_map(self) -> None:
        while not self._known.is_set():
            try:
                pmap = await self.bus.call(ep.PARTITION_MAP_GET, Empty(), timeout=1.0)
                await self._apply(pmap)
            except RemoteError as exc:
                log.debug("%s: no partition map yet: %s", self.id, exc)
            await asyncio.sleep(0.2)

    async def _on_map(self, msg: PartitionMap, _raw: Msg) -> None:
        await self._apply(msg)

    async def _apply(self, pmap: PartitionMap) -> None:
        if pmap.version <= self._map_version or not pmap.nodes:
            return
        self._map_version = pmap.version
        await self.nodes_changed(list(pmap.nodes.values()))
        self._known.set()

    async def nodes_changed(self, infos: list[NodeInfo]) -> None:
        raise NotImplementedError

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the node set is known (and, for central, its accounting adopted)."""
        await asyncio.wait_for(self._known.wait(), timeout=timeout)


STRATEGIES = ("scan", "indexed", "kube")
MIN_FEASIBLE_NODES = 100  # kube-scheduler's minFeasibleNodesToFind
MIN_FEASIBLE_PERCENT = 5  # ... and minFeasibleNodesPercentageToFind


def feasible_to_find(nodes: int) -> int:
    """kube-scheduler's numFeasibleNodesToFind with the adaptive default
    percentageOfNodesToScore: 50 - nodes/125 percent, at least 5%, at least 100 nodes."""
    if nodes < MIN_FEASIBLE_NODES:
        return nodes
    percent = max(MIN_FEASIBLE_PERCENT, 50 - nodes // 125)
    return max(MIN_FEASIBLE_NODES, nodes * percent // 100)


def kube_choose(
    order: list[NodeState], start: int, req: Resources, model: str, held: set[str]
) -> tuple[NodeState | None, int]:
    """Filter from `start` (round robin, as kube-scheduler's nextStartNodeIndex) until enough
    feasible nodes are found, score only those with the scan's score; returns the choice and
    how many nodes were examined (the next start moves on by that much)."""
    n = len(order)
    want = feasible_to_find(n)
    best: NodeState | None = None
    best_key: tuple[int, float, int, int, str] | None = None
    found = examined = 0
    while examined < n and found < want:
        node = order[(start + examined) % n]
        examined += 1
        if node.name in held or not node.fits(req):
            continue
        found += 1
        left = node.free - req
        key = (0 if model in node.models else 1, left.cpu, left.memory_mb, left.gpu, node.name)
        if best_key is None or key < best_key:
            best, best_key = node, key
    return best, examined


class CentralScheduler(_NodeListFollower):
    """One scheduler, every node: each placement chooses among the whole cluster."""

    kind = "central"

    def __init__(self, bus: Bus, *, strategy: str = "scan") -> None:
        super().__init__(bus)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        self.strategy = strategy
        self.view = PartitionView(indexed=strategy == "indexed")
        self._order: list[NodeState] = []
        self._next_start = 0

    async def start(self) -> None:
        await self.bus.serve(ep.POD_EVENTS, self._on_pod_event)
        await self._follow_map()
        await self.bus.serve(ep.PLACE_CENTRAL, self._on_place, concurrent=True)

    async def nodes_changed(self, infos: list[NodeInfo]) -> None:
        known = set(self.view.nodes)
        self.view.assign(-1, 0, infos)
        self._order = list(self.view.nodes.values())
        new = [n.name for n in infos if n.name not in known]
        if new:
            await self._adopt(new)

    async def _adopt(self, nodes: list[str]) -> None:
        """What the nodes already run, as a schedule instance adopting a partition does, but
        collected until every node is covered (a backend may answer for many nodes at once,
        in several messages): a node taken as empty when it is not would be over-committed."""
        wanted = set(nodes)
        answers: list[Inventory] = await self.bus.gather(
            ep.NODE_INVENTORY, InventoryRequest(nodes=nodes), timeout=ADOPT_TIMEOUT_S,
            max_msgs=1_000_000, done=lambda got: wanted <= inventoried(got),
        )
        for answer in answers:
            self.view.record_inventory(answer)
        missing = wanted - inventoried(answers)
        if missing:
            log.warning("%s: no inventory from %d node(s); taken as empty", self.id, len(missing))

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg) -> None:
        self.view.apply_pod_event(msg)

    async def _on_place(self, msg: PlaceRequest, _raw: Msg) -> Placement | Unschedulable:
        if not self._known.is_set():
            return Unschedulable(pod=msg.pod, service=msg.service,
                                 reason=f"{self.id} knows no nodes yet")
        node = self._choose_and_commit(msg)
        if node is None:
            return Unschedulable(pod=msg.pod, service=msg.service,
                                 reason="no node in the cluster has room")
        decided = time.time()
        try:
            await self.bus.call(
                ep.NODE_START,
                StartPod(pod=msg.pod, spec=msg.spec, node=node.name,
                         requested_at=msg.requested_at, placed_at=decided),
                timeout=START_TIMEOUT_S,
                node=node.name,
            )
        except RemoteError as exc:
            self.view.release(msg.pod)
            return Unschedulable(pod=msg.pod, service=msg.service,
                                 reason=f"node {node.name}: {exc.message}")
        return Placement(pod=msg.pod, service=msg.service, node=node.name, partition=-1,
                         epoch=0, decided_at=decided)


    def _choose_and_commit(self, msg: PlaceRequest) -> NodeState | None:
        if self.strategy != "kube" or msg.pod in self.view.pods:
            return self.view.place(msg.pod, msg.resources, msg.model)
        node, examined = kube_choose(self._order, self._next_start, msg.resources, msg.model,
                                     self.view.held)
        if self._order:
            self._next_start = (self._next_start + examined) % len(self._order)
        if node is None or not self.view.commit_on(msg.pod, node.name, msg.resources):
            return None
        return node


def _score(free: Resources, models: list[str], req: Resources, model: str) -> tuple:
    """core.PartitionView's order: cached model first, then best fit (least left over)."""
    left = free - req
    return (0 if model in models else 1, left.cpu, left.memory_mb)


class SamplingScheduler(_NodeListFollower):
    """Sparrow-like: probe `d` random eligible nodes per try, start on the better fit."""

    kind = "sampling"

    def __init__(
        self,
        bus: Bus,
        *,
        d: int = 2,
        max_tries: int = 4,
        probe_timeout_s: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(bus)
        if d < 1 or max_tries < 1:
            raise ValueError("d and max_tries must be >= 1")
        self.d = d
        self.max_tries = max_tries
        self.probe_timeout_s = probe_timeout_s
        self.rng = random.Random(seed)
        self.infos: list[NodeInfo] = []
        self._eligible: dict[Resources, list[str]] = {}
        self.probes_sent = 0

    async def start(self) -> None:
        await self._follow_map()
        await self.bus.serve(ep.PLACE_SAMPLING, self._on_place, concurrent=True)

    async def nodes_changed(self, infos: list[NodeInfo]) -> None:
        self.infos = sorted(infos, key=lambda n: n.name)
        self._eligible.clear()

    def eligible(self, req: Resources) -> list[str]:
        """Nodes whose *capacity* can hold the pod (a static constraint, as a GPU pod only
        probes GPU nodes in Sparrow); whether they have room now is what probes find out."""
        names = self._eligible.get(req)
        if names is None:
            names = [n.name for n in self.infos if req.fits_in(n.capacity)]
            self._eligible[req] = names
        return names

    async def _probe(self, node: str) -> NodeFree | None:
        try:
            return await self.bus.call(
                ep.NODE_PROBE, Empty(), timeout=self.probe_timeout_s, node=node
            )
        except RemoteError:
            return None

    async def _on_place(self, msg: PlaceRequest, _raw: Msg) -> Placement | Unschedulable:
        req, probes = msg.resources, 0
        names = self.eligible(req)
        if not names:
            return Unschedulable(pod=msg.pod, service=msg.service,
                                 reason="no node is large enough", probes=0)
        for _ in range(self.max_tries):
            sample = self.rng.sample(names, min(self.d, len(names)))
            probes += len(sample)
            self.probes_sent += len(sample)
            answers = await asyncio.gather(*(self._probe(n) for n in sample))
            fits = [a for a in answers if a is not None and req.fits_in(a.free)]
            if not fits:
                continue
            best = min(fits, key=lambda a: (*_score(a.free, a.models, req, msg.model), a.node))
            decided = time.time()
            try:
                await self.bus.call(
                    ep.NODE_START,
                    StartPod(pod=msg.pod, spec=msg.spec, node=best.node,
                             requested_at=msg.requested_at, placed_at=decided),
                    timeout=START_TIMEOUT_S,
                    headers={ep.ADMIT_IF_FITS: "1"},
                    node=best.node,
                )
            except RemoteError as exc:
                log.debug("%s: %s refused %s: %s", self.id, best.node, msg.pod, exc)
                continue  # a concurrent placement took the room between probe and start
            return Placement(pod=msg.pod, service=msg.service, node=best.node, partition=-1,
                             epoch=0, decided_at=decided, probes=probes)
        return Unschedulable(
            pod=msg.pod,
            service=msg.service,
            reason=f"{self.max_tries} tries of {self.d} random nodes found no room",
            probes=probes,
        )
