"""The `route` control function's NATS adapter: turns pod events into endpoint sets,
publishes each change to every activator, answers snapshot requests from late activators,
and writes the snapshot behind to Redis so a restarted `route` starts from it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import nats.errors
from nats.aio.msg import Msg
from redis.exceptions import RedisError

from functions.route.core import EndpointTable
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.messages import (
    Empty,
    Endpoints,
    Heartbeat,
    PodEvent,
    RoutingSnapshot,
    ServiceDeleted,
    ServiceMode,
)
from kernel.store import Store

log = logging.getLogger(__name__)


class RouteInstance:
    kind = "route"

    def __init__(self, nats_url: str, redis_url: str) -> None:
        self.id = f"route-{uuid.uuid4().hex[:6]}"
        self.nats_url = nats_url
        self.store = Store.from_url(redis_url)
        self.table = EndpointTable()
        self.bus: Bus | None = None
        self._dirty: dict[str, Endpoints] = {}
        self._flush = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.store.check_schema()
        for eps in await self.store.get_routes():
            self.table.restore(eps)
        self.bus = bus = await Bus.connect(self.nats_url, self.id)
        await bus.serve(ep.POD_EVENTS, self._on_pod_event)
        await bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        await bus.serve(ep.SERVICE_MODE, self._on_mode)
        await bus.serve(ep.ROUTES, self._on_snapshot)
        self._tasks = [
            asyncio.create_task(self._write_behind(), name=f"{self.id}-store"),
            asyncio.create_task(self._heartbeat(), name=f"{self.id}-beat"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._persist()
        if self.bus is not None:
            await self.bus.close()
        await self.store.close()

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg) -> None:
        eps = self.table.apply(msg)
        if eps is not None:
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
        assert self.bus is not None
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
            except (RedisError, OSError):
                log.warning("%s: routing snapshot of %s not saved; retrying", self.id, service,
                            exc_info=True)
                self._dirty.setdefault(service, eps)
                self._flush.set()
                ok = False
        return ok

    async def _heartbeat(self) -> None:
        assert self.bus is not None
        while True:
            try:
                await self.bus.send(
                    ep.HEARTBEAT, Heartbeat(kind=self.kind, instance=self.id, ts=time.time()),
                    kind=self.kind,
                )
            except (nats.errors.Error, OSError):
                log.debug("heartbeat lost", exc_info=True)
            await asyncio.sleep(0.5)
