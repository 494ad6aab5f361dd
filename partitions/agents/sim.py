"""The `sim` node backend: thousands of simulated nodes behind the same NATS contract as the
`local` backend, so the *real* coordinator and schedulers run unchanged against it; only the
machines are simulated. One component serves every node: one registration, one wildcard
subscription per verb, and one timer task that turns "starting" pods "ready".

It also keeps the ground truth the benchmark needs: what actually runs on each node, so
`overcommitted_nodes()` shows whether any scheduler ever put more on a node than it holds.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    Empty,
    Inventory,
    InventoryRequest,
    NodeFree,
    NodeInfo,
    PodAllocation,
    PodEvent,
    PodState,
    PodTimeline,
    Resources,
    StartPod,
    StopPod,
    encode,
)
from kernel.shards import ShardFence
from partitions.agents.contract import (
    NODE_HEARTBEAT_S,
    NodeHeartbeater,
    count_refusal,
    follow_map,
    follow_shards,
    register,
    stop_refusal,
)
from partitions.fencing import EpochFence

log = logging.getLogger(__name__)

PREFILL_SERVICE = "prefill"
# Inventory replies are split so one stays far below NATS' default 1 MiB max payload.
INVENTORY_CHUNK_PODS = 2000


@dataclass
class SimPod:
    alloc: PodAllocation
    node: str
    start: StartPod | None = None  # None for pods that existed before the simulation
    state: PodState = "ready"
    spawned_at: float = 0.0
    ready_at: float = 0.0
    warm: bool = False  # the node had the pod's model cached when it started


@dataclass
class SimNode:
    info: NodeInfo
    used: Resources = Resources()
    pods: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)

    @property
    def free(self) -> Resources:
        return self.info.capacity - self.used

    def over_committed(self) -> bool:
        f = self.free
        return f.cpu < -1e-9 or f.memory_mb < 0 or f.gpu < 0


@dataclass
class SimStats:
    started: int = 0
    stopped: int = 0
    warm_starts: int = 0  # pods started on a node that already cached their model
    refused_fence: int = 0
    refused_fit: int = 0  # node-side admission refusals (sampling baseline only)
    duplicate_starts: int = 0  # a pod already running elsewhere: a double placement
    probes: int = 0
    expired: int = 0  # pods stopped by the sim itself at the end of their `lifetime_s`
    events: int = 0  # pod events published (what every subscriber must apply)


def prefill_pods(info: NodeInfo, fraction: float, pods: int) -> list[PodAllocation]:
    """Pre-existing pods taking `fraction` of the node, split into `pods` near-equal pods."""
    if fraction <= 0:
        return []
    cap = info.capacity
    total = Resources(
        cpu=round(cap.cpu * fraction, 3),
        memory_mb=int(cap.memory_mb * fraction),
        gpu=math.floor(cap.gpu * fraction),
    )
    n = max(1, pods)
    share = Resources(
        cpu=round(total.cpu / n, 3), memory_mb=total.memory_mb // n, gpu=total.gpu // n
    )
    out: list[PodAllocation] = []
    left = total
    for i in range(n):
        res = share if i < n - 1 else left  # the last pod takes the rounding remainder
        left = left - res
        out.append(
            PodAllocation(
                pod=f"{PREFILL_SERVICE}-{info.name}-{i}", service=PREFILL_SERVICE, resources=res
            )
        )
    return out


class SimCluster(Component):
    """Many simulated nodes; pods become ready `start_delay_s` after their StartPod."""

    def __init__(
        self,
        bus: Bus,
        nodes: list[NodeInfo],
        *,
        start_delay_s: float = 0.05,
        prefill: float = 0.0,
        prefill_pods_per_node: int = 2,
        clock: Callable[[], float] = time.time,
        unpartitioned: bool = False,
        heartbeat_s: float = NODE_HEARTBEAT_S,
        prefill_of: Callable[[NodeInfo], float] | None = None,
        lifetime_s: float = 0.0,
    ) -> None:
        """`unpartitioned`: also take starts that name no partition, from the benchmark's
        baseline schedulers (which own none); never so outside the benchmark.
        `prefill_of`: each node's own pre-filled fraction (a skewed cluster) instead of
        `prefill`. `lifetime_s` > 0: started pods stop by themselves that long after they are
        ready, so a steady placement rate is a steady pod lifecycle (start, ready,
        terminating, stopped) rather than a cluster that fills up."""
        if not 0.0 <= prefill < 1.0:
            raise ValueError("prefill must be a fraction in [0, 1)")
        super().__init__(bus)
        self.name = bus.name
        self.start_delay_s = start_delay_s
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.lifetime_s = lifetime_s
        self.nodes: dict[str, SimNode] = {}
        self.pods: dict[str, SimPod] = {}
        self.fence = EpochFence(allow_unpartitioned=unpartitioned)
        self.shards = ShardFence()
        self.stats = SimStats()
        # (due at, seq, pod, "ready" | "stop"): the timer heap
        self._due: list[tuple[float, int, str, str]] = []
        self._seq = 0
        self._wake = asyncio.Event()
        for info in nodes:
            node = SimNode(info, models=set(info.models))
            self.nodes[info.name] = node
            fraction = prefill_of(info) if prefill_of is not None else prefill
            for alloc in prefill_pods(info, fraction, prefill_pods_per_node):
                self._commit(node, SimPod(alloc, info.name))

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        bus = self.bus
        # One subscription per verb for every node (thousands of nodes, not thousands of
        # subscriptions); the subject says which node.
        await bus.serve(ep.NODE_START, self._on_start)
        await bus.serve(ep.NODE_STOP, self._on_stop)
        await bus.serve(ep.NODE_PROBE, self._on_probe)
        await bus.serve(ep.NODE_INVENTORY, self._on_inventory)
        self.tasks.spawn(self._run_timers(), name="timers")
        await register(bus, [n.info for n in self.nodes.values()])
        # One heartbeat for every node: thousands of names in one message each second.
        beats = NodeHeartbeater(bus, nodes=lambda: self.nodes.keys(), rejoin=self._rejoin,
                                interval_s=self.heartbeat_s)
        self.tasks.spawn(beats.run(), name="heartbeat")
        await follow_map(bus, self.fence)
        await follow_shards(bus, self.shards)

    async def _rejoin(self, names: list[str]) -> None:
        """Nodes the coordinator took for lost: register them again and say again what
        their started pods are doing (`route` and `scale` dropped them)."""
        nodes = [self.nodes[n] for n in names if n in self.nodes]
        await register(self.bus, [n.info for n in nodes])
        for node in nodes:
            for name in sorted(node.pods):
                pod = self.pods[name]
                await self._emit(pod, pod.state)

    # ---- ground truth ---------------------------------------------------------------------

    def overcommitted_nodes(self) -> list[str]:
        """Nodes whose running pods need more than the node has: must stay empty."""
        return sorted(name for name, n in self.nodes.items() if n.over_committed())

    def usage(self, node: str) -> Resources:
        return self.nodes[node].used

    def started_pods(self) -> dict[str, str]:
        """Pods started through StartPod (not prefilled) → their node."""
        return {p: sp.node for p, sp in self.pods.items() if sp.start is not None}

    def _commit(self, node: SimNode, pod: SimPod) -> None:
        node.used = node.used + pod.alloc.resources
        node.pods.add(pod.alloc.pod)
        self.pods[pod.alloc.pod] = pod

    def _release(self, pod: SimPod) -> None:
        node = self.nodes[pod.node]
        if pod.alloc.pod in node.pods:
            node.pods.discard(pod.alloc.pod)
            node.used = node.used - pod.alloc.resources
        self.pods.pop(pod.alloc.pod, None)

    # ---- the node contract ----------------------------------------------------------------

    def _node_of(self, raw: Msg) -> SimNode | None:
        # fnplane.node.{node}.{verb}, for every node verb
        return self.nodes.get(raw.subject.split(".")[2])

    async def _on_start(self, msg: StartPod, raw: Msg) -> Empty | None:
        node = self._node_of(raw)
        if node is None:
            return None  # another backend's node on the same wildcard: not ours to answer
        if msg.node != node.info.name:
            raise RemoteError(
                ErrorCode.INVALID, f"StartPod for {msg.node} sent to node {node.info.name}"
            )
        known = self.pods.get(msg.pod)
        if known is not None:
            if known.node == node.info.name:
                return Empty()  # a retried start: idempotent, as the local backend
            self.stats.duplicate_starts += 1
            raise RemoteError(ErrorCode.CONFLICT, f"pod {msg.pod} already runs on {known.node}")
        if (refused := self.fence.refusal(msg)) is not None:
            self.stats.refused_fence += 1
            count_refusal(self.metrics, refused, "start")
            raise refused
        res = msg.spec.resources
        if raw.headers and raw.headers.get(ep.ADMIT_IF_FITS) and not res.fits_in(node.free):
            self.stats.refused_fit += 1
            raise RemoteError(
                ErrorCode.NO_CAPACITY, f"node {node.info.name} has no room for {msg.pod}"
            )
        now = self.clock()
        model = msg.spec.model_id
        pod = SimPod(
            PodAllocation(pod=msg.pod, service=msg.spec.name, resources=res),
            node.info.name,
            msg,
            state="starting",
            spawned_at=now,
            warm=model in node.models,
        )
        # Accepted even when it does not fit: a real kubelet-less node would run it too,
        # and over-commit is exactly what the benchmark must be able to see.
        self._commit(node, pod)
        self.stats.started += 1
        self.stats.warm_starts += pod.warm
        await self._emit(pod, "starting")
        self._seq += 1
        heapq.heappush(self._due, (now + self.start_delay_s, self._seq, msg.pod, "ready"))
        self._wake.set()
        return Empty()

    async def _on_stop(self, msg: StopPod, raw: Msg) -> Empty | None:
        node = self._node_of(raw)
        if node is None:
            return None
        if (refused := stop_refusal(self.shards, msg)) is not None:
            count_refusal(self.metrics, refused, "stop")
            raise refused
        pod = self.pods.get(msg.pod)
        if pod is not None and pod.node == node.info.name:
            await self._emit(pod, "terminating", reason=msg.reason)
            pod.state = "stopped"  # the timer skips it if it was still starting
            self._release(pod)
            self.stats.stopped += 1
            await self._emit(pod, "stopped", reason=msg.reason)
        return Empty()

    async def _on_probe(self, _msg: Empty, raw: Msg) -> NodeFree | None:
        node = self._node_of(raw)
        if node is None:
            return None
        self.stats.probes += 1
        return NodeFree(node=node.info.name, free=node.free, models=sorted(node.models))

    async def _on_inventory(self, msg: InventoryRequest, raw: Msg) -> None:
        """One answer for all requested nodes we have (in chunks if large); none if we have
        none of them, so other backends' nodes answer for themselves."""
        if not raw.reply:
            return
        pods: dict[str, list[PodAllocation]] = {}
        count = 0
        chunks: list[dict[str, list[PodAllocation]]] = []
        for name in msg.nodes:
            node = self.nodes.get(name)
            if node is None:
                continue
            pods[name] = [self.pods[p].alloc for p in sorted(node.pods)]
            count += len(pods[name])
            if count >= INVENTORY_CHUNK_PODS:
                chunks.append(pods)
                pods, count = {}, 0
        if pods:
            chunks.append(pods)
        for chunk in chunks:
            await self.bus.nc.publish(raw.reply, encode(Inventory(pods=chunk)))

    # ---- time -----------------------------------------------------------------------------

    async def _run_timers(self) -> None:
        """One task for every pending start: sleep until the earliest is due, make every due
        pod ready. (A task per pod would mean thousands of sleeping tasks at full load.)"""
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._due[0][0] - self.clock()
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                except TimeoutError:
                    pass
                continue
            now = self.clock()
            while self._due and self._due[0][0] <= now:
                _, _, name, verb = heapq.heappop(self._due)
                pod = self.pods.get(name)
                if verb == "stop":
                    if pod is not None and pod.state == "ready":
                        await self._expire(pod)
                    continue
                if pod is None or pod.state != "starting":
                    continue
                pod.state, pod.ready_at = "ready", now
                if pod.start is not None:  # loading the weights put them in the node's cache
                    self.nodes[pod.node].models.add(pod.start.spec.model_id)
                await self._emit(pod, "ready")
                if self.lifetime_s > 0:
                    self._seq += 1
                    heapq.heappush(self._due, (now + self.lifetime_s, self._seq, name, "stop"))

    async def _expire(self, pod: SimPod) -> None:
        """The end of a pod's lifetime, as a scale-down would stop it."""
        await self._emit(pod, "terminating", reason="lifetime")
        pod.state = "stopped"
        self._release(pod)
        self.stats.stopped += 1
        self.stats.expired += 1
        await self._emit(pod, "stopped", reason="lifetime")

    async def _emit(self, pod: SimPod, state: PodState, *, reason: str = "") -> None:
        start = pod.start
        if start is None:
            return  # prefilled pods were never announced and are never watched
        ev = PodEvent(
            pod=start.pod,
            service=start.spec.name,
            node=pod.node,
            state=state,
            url=f"sim://{pod.node}/{start.pod}",
            container_concurrency=start.spec.container_concurrency,
            resources=start.spec.resources,
            timeline=PodTimeline(requested_at=start.requested_at, placed_at=start.placed_at,
                                 spawned_at=pod.spawned_at, ready_at=pod.ready_at),
            reason=reason,
            ts=self.clock(),
        )
        self.stats.events += 1
        try:
            await self.bus.send(ep.POD_EVENTS, ev, service=start.spec.name,
                                partition=self.fence.event_partition(pod.node))
        except (nats.errors.Error, OSError):
            log.warning("%s: pod event lost", self.name, exc_info=True)
