"""The `route` control function's NATS adapter: turns pod events into endpoint sets,
publishes each change to every activator, answers snapshot requests from late activators,
and writes the snapshot behind to Redis so a restarted `route` starts from it.

Sharded by service (kernel/shards.py): an instance keeps and publishes the endpoint sets of
its shards' services only, each stamped with the shard's epoch, so activators order sets as
(epoch, version) and refuse a stale owner's. A new owner of a shard rebuilds it from the
Redis snapshot and the node agents' announcement of the shard's live pods, then publishes
every set of it under its epoch."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.msg import Msg
from redis.exceptions import RedisError

from functions.route.core import EndpointTable
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.heartbeat import Heartbeater
from kernel.messages import (
    AnnounceRequest,
    Empty,
    Endpoints,
    NodesLost,
    PodEvent,
    PodsAnnounced,
    RoutingSnapshot,
    ServiceDeleted,
    ServiceMode,
)
from kernel.metrics import revision_labels
from kernel.shard_owner import ShardOwnership
from kernel.shards import shard_of
from kernel.store import Store

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
# How long a new shard owner waits for the node agents' announcement of the shard's pods.
ANNOUNCE_S = 0.3


class RouteInstance(Component):
    """Owns `store` as it owns its bus."""

    kind = "route"

    def __init__(self, bus: Bus, store: Store, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        super().__init__(bus)
        self.store = store
        self.table = EndpointTable()
        self.heartbeat_s = heartbeat_s
        self._dirty: dict[str, Endpoints] = {}
        self._flush = asyncio.Event()
        self.shards = ShardOwnership(bus, "route", on_change=self._on_shards)
        self._published = 0

    async def start(self) -> None:
        await self.store.check_schema()
        await self.bus.serve(ep.POD_EVENTS, self._on_pod_event)
        await self.bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        await self.bus.serve(ep.NODE_LOST, self._on_nodes_lost)
        await self.bus.serve(ep.SERVICE_MODE, self._on_mode)
        await self.bus.serve(ep.ROUTES, self._on_snapshot)
        await self.shards.start()
        self.tasks.spawn(self._write_behind(), name="store")
        self.tasks.spawn(Heartbeater(self.bus, "route", interval_s=self.heartbeat_s,
                                     load=self._load).run(), name="beat")

    def _load(self, elapsed_s: float) -> dict[str, float]:
        published, self._published = self._published, 0
        return {"requests_per_s": published / elapsed_s, "shards": len(self.shards.owned)}

    async def _on_shards(self, gained: dict[int, int], lost: set[int]) -> None:
        count = self.shards.fence.count
        for service in [s for s in self.table.services if shard_of(s, count) in lost]:
            del self.table.services[service]
            self._dirty.pop(service, None)
        if not gained:
            return
        mine = set(gained)
        try:
            stored = [e for e in await self.store.get_routes()
                      if shard_of(e.service, count) in mine]
        except (RedisError, OSError) as exc:
            log.warning("%s: no routing snapshot for the new shards (%s)", self.id, exc)
            stored = []
        answers: list[PodsAnnounced] = await self.bus.gather(
            ep.NODE_ANNOUNCE, AnnounceRequest(shards=sorted(mine), count=count),
            timeout=ANNOUNCE_S)
        for eps in self.table.rebuild(mine, count, stored, answers):
            await self._publish(eps)

    async def stop(self) -> None:
        await self.tasks.close()
        await self._persist()
        await super().stop()
        await self.store.close()

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg) -> None:
        if not self.shards.owns(msg.service):
            return
        eps = self.table.apply(msg)
        if eps is not None:
            await self._publish(eps)

    async def _on_nodes_lost(self, msg: NodesLost, _raw: Msg) -> None:
        for eps in self.table.drop_nodes(set(msg.nodes)):
            log.warning("%s: %s lost its pods on %s", self.id, eps.service,
                        ", ".join(msg.nodes[:5]))
            await self._publish(eps)

    async def _on_mode(self, msg: ServiceMode, _raw: Msg) -> None:
        if not self.shards.owns(msg.service):
            return
        if (why := self.shards.fence.check("scale", msg.service, msg.epoch)) is not None:
            log.warning("%s: mode of %s refused: %s", self.id, msg.service, why)
            return
        eps = self.table.set_mode(msg.service, msg.mode)
        if eps is not None:
            await self._publish(eps)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        if not self.shards.owns(msg.name):
            return
        await self._publish(self.table.drop(msg.name))

    async def _on_snapshot(self, _msg: Empty, _raw: Msg) -> RoutingSnapshot:
        return RoutingSnapshot(services=[self._stamped(e) for e in self.table.all()
                                         if self.shards.owns(e.service)])

    def _stamped(self, eps: Endpoints) -> Endpoints:
        return msgspec.structs.replace(eps, epoch=self.shards.epoch(eps.service) or 0)

    async def _publish(self, eps: Endpoints) -> None:
        epoch = self.shards.epoch(eps.service)
        if epoch is None:
            return  # the shard moved on while we worked on it
        eps = msgspec.structs.replace(eps, epoch=epoch)
        self._published += 1
        self.metrics.counter("fnplane.route.updates").add(1, revision_labels(eps.service))
        await self.bus.send(ep.ENDPOINTS, eps, service=eps.service)
        self._dirty[eps.service] = eps
        self._flush.set()

    async def _write_behind(self) -> None:
        failures = 0
        while True:
            await self._flush.wait()
            self._flush.clear()
            failures = 0 if await self._persist() else failures + 1
            await asyncio.sleep(min(0.1 * 2**failures, 5.0))  # back off while Redis refuses

    async def _persist(self) -> bool:
        """Write what changed; what Redis refused stays dirty for the next round (unless a
        newer version of the same service arrived meanwhile, which supersedes it)."""
        dirty, self._dirty = self._dirty, {}
        ok = True
        for service, eps in dirty.items():
            try:
                await self.store.put_endpoints(eps)
            except (RedisError, OSError) as exc:
                log.warning("%s: routing snapshot of %s not saved (%s); retrying", self.id,
                            service, exc)
                self._dirty.setdefault(service, eps)
                self._flush.set()
                ok = False
        return ok
