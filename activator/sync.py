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
    ShardMap,
    SpecUpdated,
)
from kernel.shards import ShardFence
from kernel.tasks import TaskGroup

log = logging.getLogger(__name__)


class ServiceSync:
    def __init__(self, bus: Bus, table: ServiceTable, tasks: TaskGroup, *, log_id: str) -> None:
        self.bus = bus
        self.table = table
        self.tasks = tasks
        self.id = log_id
        # The `route` shard epochs: a set from an owner that lost its shard is refused.
        self.shards = ShardFence()
        self.route_owners = 0

    async def start(self) -> None:
        await self.bus.serve(ep.SHARD_MAP, self._on_shard_map)
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
                for rev in st.revisions:  # before the split that names them
                    self._upsert(rev.spec)
                self._upsert(st.spec)
        except RemoteError as exc:
            log.warning("%s: no service list yet (%s); learning from events", self.id, exc)
        try:
            self._on_map(await self.bus.call(ep.SHARD_MAP_GET, Empty(), timeout=2.0))
        except RemoteError as exc:
            log.warning("%s: no shard map yet (%s)", self.id, exc)
        # Each `route` instance answers for its shards: wait for as many as own shards.
        snaps: list[RoutingSnapshot] = await self.bus.gather(
            ep.ROUTES, Empty(), timeout=2.0,
            done=lambda got: len(got) >= max(self.route_owners, 1))
        if not snaps:
            log.warning("%s: no routing snapshot yet", self.id)
        for snap in snaps:
            for eps in snap.services:
                self._apply(eps)

    async def lookup(self, name: str) -> ServiceSpec | None:
        svc = self.table.get(name)
        if svc is not None:
            return svc.spec
        if (router := self.table.router(name)) is not None:
            return router
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

    def _on_map(self, smap: ShardMap) -> None:
        if self.shards.apply(smap):
            self.route_owners = len({s.owner for s in smap.shards.get("route", []) if s.owner})

    async def _on_shard_map(self, msg: ShardMap, _raw: Msg) -> None:
        self._on_map(msg)

    def _apply(self, eps: Endpoints) -> None:
        if (why := self.shards.check("route", eps.service, eps.epoch)) is not None:
            log.warning("%s: endpoints of %s refused: %s", self.id, eps.service, why)
            return
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
