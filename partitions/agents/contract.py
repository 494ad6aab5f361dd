"""What every node backend (`local`, `sim`, `kubernetes`) does the same way on NATS: announce
its nodes to the coordinator and say every second that they are alive (a node nobody vouches
for leaves its partition), follow the partition map so its nodes can refuse a start from a
stale owner (`partitions.fencing`), and announce its pods' events (again after an outage, or
when the coordinator took its nodes for lost)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import nats.errors

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    AnnounceRequest,
    NodeInfo,
    NodeRegistration,
    NodesAlive,
    PodEvent,
    PodsAnnounced,
    StopPod,
    UnknownNodes,
    encode,
)
from kernel.metrics import Metrics
from kernel.shards import ShardFence, shard_of
from partitions.fencing import EpochFence

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often an agent says its nodes are alive; the coordinator's `node_heartbeat_timeout_s`
# (5 s by default) is several of these, so one late beat never costs a node its partition.
NODE_HEARTBEAT_S = 1.0


def chunks(bus: Bus, items: Sequence[T], size_of: Callable[[Sequence[T]], int]
           ) -> list[Sequence[T]]:
    """`items` in as few slices as the server's max payload allows (a `sim` backend has
    thousands of nodes); `size_of` is the encoded size of a message carrying a slice."""
    if not items:
        return []
    limit = max(bus.nc.max_payload - 4096, 4096)
    size = size_of(items)
    per_msg = max(1, len(items) * limit // size) if size > limit else len(items)
    return [items[i : i + per_msg] for i in range(0, len(items), per_msg)]


async def register(bus: Bus, infos: list[NodeInfo], *, attempts: int = 100) -> None:
    """Register nodes, as few messages as the server's max payload allows; each retried
    with a growing pause until the coordinator answers."""
    for part in chunks(bus, infos, lambda s: len(encode(NodeRegistration(infos=list(s))))):
        msg = NodeRegistration(infos=list(part))
        for attempt in range(attempts):
            try:
                await bus.call(ep.NODE_REGISTER, msg, timeout=2.0)
                break
            except RemoteError:
                await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
        else:
            log.error("the coordinator never answered the registration of %s",
                      ", ".join(n.name for n in msg.infos[:5]))


class NodeHeartbeater:
    """Says every `interval_s` that this agent's nodes are alive: one `NodesAlive` per agent
    (split only past the max payload), never one per node. Nodes the coordinator answers it
    does not know (it restarted, or expired them while we were silent) rejoin through
    `rejoin`: register again and announce their pods again. A rejoin runs beside the beats,
    so a slow one never silences the agent's other nodes."""

    def __init__(self, bus: Bus, *, nodes: Callable[[], Iterable[str]],
                 rejoin: Callable[[list[str]], Awaitable[None]],
                 interval_s: float = NODE_HEARTBEAT_S,
                 caches: Callable[[], dict[str, dict[str, int]]] | None = None) -> None:
        self.bus = bus
        # Node → model → bytes its model cache holds, said with the beats (nodes with one).
        self.caches = caches
        self.nodes = nodes
        self.rejoin = rejoin
        self.interval_s = interval_s
        self._rejoining: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            while True:
                await self.beat()
                await asyncio.sleep(self.interval_s)
        finally:
            if self._rejoining is not None:
                self._rejoining.cancel()

    async def beat(self) -> None:
        agent = self.bus.name

        def size(part: Sequence[str]) -> int:
            return len(encode(NodesAlive(agent=agent, nodes=list(part))))

        caches = self.caches() if self.caches is not None else {}
        unknown: list[str] = []
        for part in chunks(self.bus, sorted(self.nodes()), size):
            said = {n: caches[n] for n in part if n in caches}
            try:
                reply: UnknownNodes = await self.bus.call(
                    ep.NODE_HEARTBEAT, NodesAlive(agent=agent, nodes=list(part), caches=said),
                    timeout=self.interval_s)
            except (RemoteError, nats.errors.Error, OSError):
                # No coordinator now (restarting, NATS down): the next beat tries again.
                log.debug("%s: node heartbeat lost", self.bus.name, exc_info=True)
                continue
            unknown += reply.nodes
        if unknown and (self._rejoining is None or self._rejoining.done()):
            log.warning("%s: the coordinator does not know %d of our nodes (%s); registering "
                        "them again", self.bus.name, len(unknown), ", ".join(unknown[:5]))
            self._rejoining = asyncio.create_task(self._rejoin(unknown),
                                                  name=f"{self.bus.name}/rejoin")

    async def _rejoin(self, nodes: list[str]) -> None:
        try:
            await self.rejoin(nodes)
        except (RemoteError, nats.errors.Error, OSError):
            log.warning("%s: rejoining %s failed; the next beat tries again", self.bus.name,
                        ", ".join(nodes[:5]), exc_info=True)


async def follow_map(bus: Bus, fence: EpochFence) -> None:
    """Keep `fence` on the current partition map: every change, and the map as it is now."""
    await bus.follow(ep.PARTITION_MAP, ep.PARTITION_MAP_GET, fence.apply)


async def follow_shards(bus: Bus, fence: ShardFence) -> None:
    """Keep `fence` on the current service shard map, so a node refuses a stop from a
    `scale` instance that lost the service's shard."""
    await bus.follow(ep.SHARD_MAP, ep.SHARD_MAP_GET, fence.apply)


def count_refusal(metrics: Metrics, refused: RemoteError, op: str) -> None:
    """A fenced refusal (a stale owner's start or stop), counted: frequent ones say a map
    is slow to reach someone."""
    metrics.counter("fnplane.node.refusals").add(
        1, {"reason": refused.code.name.lower(), "op": op})


def stop_refusal(fence: ShardFence, stop: StopPod) -> RemoteError | None:
    why = fence.check("scale", stop.service, stop.epoch)
    return None if why is None else RemoteError(ErrorCode.STALE_EPOCH, why)


# Terminal events sent this long before a connection loss was noticed may have vanished
# with it (nats-py writes into a dead socket until it sees the loss).
AT_RISK_S = 2.0
_TERMINAL = ("stopped", "failed")


class PodAnnouncer:
    """Sends a node's pod events and says them again after a NATS outage, so `route` and
    `scale` do not keep a pod that ended meanwhile, or miss one that became ready: the
    latest event of every live pod, and the terminal events of the outage (and of the
    moments before it) once more. Consumers treat a repeated event as no change."""

    def __init__(self, bus: Bus, *, what: str, fence: EpochFence) -> None:
        self.bus = bus
        self.what = what
        self.fence = fence  # the map, for the partition each event is published under
        self._live: dict[str, PodEvent] = {}
        self._ended: collections.deque[PodEvent] = collections.deque(maxlen=1000)
        bus.on_reconnect(self._again)

    async def send(self, ev: PodEvent) -> None:
        if ev.state in _TERMINAL:
            self._live.pop(ev.pod, None)
            self._ended.append(ev)
        else:
            self._live[ev.pod] = ev
        try:
            await self._publish(ev)
        except (nats.errors.Error, OSError):
            log.warning("%s: pod event lost; said again after the reconnect", self.what,
                        exc_info=True)

    async def _publish(self, ev: PodEvent) -> None:
        await self.bus.send(ep.POD_EVENTS, ev, service=ev.service,
                            partition=self.fence.event_partition(ev.node))

    def announced(self, req: AnnounceRequest, nodes: list[str]) -> PodsAnnounced:
        """The live pods of services in the asked shards: what a new shard owner rebuilds
        from (a pod that ended is absent, so the owner drops it)."""
        shards = set(req.shards)
        events = [e for e in self._live.values()
                  if shard_of(e.service, req.count) in shards]
        return PodsAnnounced(nodes=nodes, events=events)

    async def again_live(self, nodes: set[str] | None = None) -> None:
        """Say the latest event of every live pod (on `nodes`, if given) once more: the
        coordinator took those nodes for lost, and `route` and `scale` dropped their pods."""
        for ev in [e for e in self._live.values() if nodes is None or e.node in nodes]:
            try:
                await self._publish(ev)
            except (nats.errors.Error, OSError):
                log.warning("%s: pod event lost again", self.what, exc_info=True)
                return

    async def _again(self, since: float) -> None:
        ended = [ev for ev in self._ended if ev.ts >= since - AT_RISK_S]
        live = list(self._live.values())
        log.info("%s: NATS is back; announcing %d live and %d ended pods again", self.what,
                 len(live), len(ended))
        for ev in [*ended, *live]:
            try:
                await self._publish(ev)
            except (nats.errors.Error, OSError):
                log.warning("%s: pod event lost again", self.what, exc_info=True)
                return
