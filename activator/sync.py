"""Keeps the service table in step with the control plane: the registry's spec events and
`route`'s endpoint sets as they happen; at start, the service list and the routing snapshot
a late activator missed; and, for a request to a service it has not heard of yet (its
deploy event may still be in flight), the registry's answer."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from activator.services import ServiceTable
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    Empty,
    Endpoints,
    NameRequest,
    RoutingSnapshot,
    ServiceDeleted,
    ServiceList,
    ServiceSpec,
    SpecUpdated,
)
from kernel.tasks import TaskGroup

log = logging.getLogger(__name__)


class ServiceSync:
    def __init__(self, bus: Bus, table: ServiceTable, tasks: TaskGroup, *, log_id: str) -> None:
        self.bus = bus
        self.table = table
        self.tasks = tasks
        self.id = log_id

    async def start(self) -> None:
        await self.bus.serve(ep.ENDPOINTS, self._on_endpoints)
        await self.bus.serve(ep.SERVICE_UPDATED, self._on_spec_updated)
        await self.bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        # Events published while NATS was away are gone: catch up as a late activator does.
        self.bus.on_reconnect(lambda _since: self._catch_up())
        await self._catch_up()

    async def _catch_up(self) -> None:
        try:
            services: ServiceList = await self.bus.call(ep.ADMIN_LIST, Empty(), timeout=2.0)
            for st in services.services:
                self._upsert(st.spec)
        except RemoteError as exc:
            log.warning("%s: no service list yet (%s); learning from events", self.id, exc)
        try:
            snap: RoutingSnapshot = await self.bus.call(ep.ROUTES, Empty(), timeout=2.0)
            for eps in snap.services:
                self._apply(eps)
        except RemoteError as exc:
            log.warning("%s: no routing snapshot yet (%s)", self.id, exc)

    async def lookup(self, name: str) -> ServiceSpec | None:
        svc = self.table.get(name)
        if svc is not None:
            return svc.spec
        try:
            reply: SpecUpdated = await self.bus.call(ep.ADMIN_SPEC, NameRequest(name=name),
                                                     timeout=1.0)
        except RemoteError as exc:
            if exc.code is ErrorCode.NOT_FOUND:
                return None
            raise  # a busy or restarting registry is not "no such model": the caller says 503
        self._upsert(reply.spec)
        return reply.spec

    def _upsert(self, spec: ServiceSpec) -> None:
        retired = self.table.upsert(spec)
        if retired is not None:
            self.tasks.spawn(retired.close(timeout=5.0), name=f"close-batcher-{spec.name}")

    def _apply(self, eps: Endpoints) -> None:
        failed = self.table.apply_endpoints(eps)
        if failed:
            log.warning("%s: %d requests to %s failed: %s", self.id, failed, eps.service,
                        eps.error)

    async def _on_spec_updated(self, msg: SpecUpdated, _raw: Msg) -> None:
        self._upsert(msg.spec)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        svc = self.table.remove(msg.name)
        if svc is not None and svc.batcher is not None:
            self.tasks.spawn(svc.batcher.close(timeout=5.0), name=f"close-batcher-{msg.name}")

    async def _on_endpoints(self, msg: Endpoints, _raw: Msg) -> None:
        self._apply(msg)
