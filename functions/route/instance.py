"""The `route` control function's NATS adapter: turns pod events into endpoint sets,
publishes each change to every activator, answers snapshot requests from late activators,
and writes the snapshot behind to Redis so a restarted `route` starts from it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.msg import Msg

from functions.route.core import EndpointTable
from kernel import subjects
from kernel.bus import Bus
from kernel.messages import (
    Endpoints,
    Heartbeat,
    Message,
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
        for eps in await self.store.get_routes():
            self.table.restore(eps)
        self.bus = bus = await Bus.connect(self.nats_url, self.id)
        await bus.subscribe(f"{subjects.POD_EVENTS}.>", self._on_pod_event)
        await bus.subscribe(subjects.SPEC_EVENTS, self._on_spec_event)
        await bus.subscribe(subjects.MODE, self._on_mode)
        await bus.subscribe(subjects.ROUTE_SNAPSHOT, self._on_snapshot, queue="route")
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

    async def _on_pod_event(self, msg: Message, _raw: Msg) -> None:
        if not isinstance(msg, PodEvent):
            return
        eps = self.table.apply(msg)
        if eps is not None:
            await self._publish(eps)

    async def _on_mode(self, msg: Message, _raw: Msg) -> None:
        if isinstance(msg, ServiceMode):
            eps = self.table.set_mode(msg.service, msg.mode)
            if eps is not None:
                await self._publish(eps)

    async def _on_spec_event(self, msg: Message, _raw: Msg) -> None:
        if isinstance(msg, ServiceDeleted):
            await self._publish(self.table.drop(msg.name))

    async def _on_snapshot(self, _msg: Message, _raw: Msg) -> Message:
        return RoutingSnapshot(self.table.all())

    async def _publish(self, eps: Endpoints) -> None:
        assert self.bus is not None
        await self.bus.publish(f"{subjects.ENDPOINTS}.{eps.service}", eps)
        self._dirty[eps.service] = eps
        self._flush.set()

    async def _write_behind(self) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            await self._persist()
            await asyncio.sleep(0.1)

    async def _persist(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for eps in dirty.values():
            try:
                await self.store.put_endpoints(eps)
            except Exception:
                log.warning("%s: routing snapshot not saved", self.id, exc_info=True)

    async def _heartbeat(self) -> None:
        assert self.bus is not None
        while True:
            try:
                await self.bus.publish(
                    f"{subjects.HEARTBEAT}.{self.kind}", Heartbeat(self.kind, self.id, time.time())
                )
            except Exception:
                log.debug("heartbeat lost", exc_info=True)
            await asyncio.sleep(0.5)
