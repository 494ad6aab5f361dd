"""The `route` control function's NATS adapter: turns pod events into endpoint sets,
publishes each change to every activator, answers snapshot requests from late activators,
and writes the snapshot behind to Redis so a restarted `route` starts from it."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from redis.exceptions import RedisError

from functions.route.core import EndpointTable
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.heartbeat import Heartbeater
from kernel.messages import (
    Empty,
    Endpoints,
    NodesLost,
    PodEvent,
    RoutingSnapshot,
    ServiceDeleted,
    ServiceMode,
)
from kernel.store import Store

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5


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

    async def start(self) -> None:
        await self.store.check_schema()
        for eps in await self.store.get_routes():
            self.table.restore(eps)
        await self.bus.serve(ep.POD_EVENTS, self._on_pod_event)
        await self.bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        await self.bus.serve(ep.NODE_LOST, self._on_nodes_lost)
        await self.bus.serve(ep.SERVICE_MODE, self._on_mode)
        await self.bus.serve(ep.ROUTES, self._on_snapshot)
        self.tasks.spawn(self._write_behind(), name="store")
        self.tasks.spawn(Heartbeater(self.bus, "route", interval_s=self.heartbeat_s).run(),
                         name="beat")

    async def stop(self) -> None:
        await self.tasks.close()
        await self._persist()
        await super().stop()
        await self.store.close()

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg) -> None:
        eps = self.table.apply(msg)
        if eps is not None:
            await self._publish(eps)

    async def _on_nodes_lost(self, msg: NodesLost, _raw: Msg) -> None:
        for eps in self.table.drop_nodes(set(msg.nodes)):
            log.warning("%s: %s lost its pods on %s", self.id, eps.service,
                        ", ".join(msg.nodes[:5]))
            await self._publish(eps)

    async def _on_mode(self, msg: ServiceMode, _raw: Msg) -> None:
        eps = self.table.set_mode(msg.service, msg.mode)
        if eps is not None:
            await self._publish(eps)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        await self._publish(self.table.drop(msg.name))

    async def _on_snapshot(self, _msg: Empty, _raw: Msg) -> RoutingSnapshot:
        return RoutingSnapshot(services=self.table.all())

    async def _publish(self, eps: Endpoints) -> None:
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
