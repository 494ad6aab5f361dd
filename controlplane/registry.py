"""The service registry behind the admin API the CLI talks to (`fnplane.admin.*` on NATS).

Specs are validated here, once, and stored in Redis before anyone hears of them, so a spec
that was acknowledged survives a restart. Every change is announced on the service event
subject; status answers gather what `scale` and `route` know at that moment.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.apikeys import is_service_name, new_key
from kernel.bus import Bus
from kernel.component import Component
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    ColdStart,
    DeployRequest,
    Empty,
    Endpoints,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyQuery,
    KeyRevoke,
    KeyRevoked,
    NameRequest,
    PartitionMap,
    PrefetchModel,
    RoutingSnapshot,
    ScaleStatus,
    ServiceDeleted,
    ServiceList,
    ServiceSpec,
    ServiceStatus,
    SpecError,
    SpecUpdated,
)
from kernel.shards import shard_of
from kernel.store import Store
from partitions.modelcache.placement import prefetch_nodes
from partitions.modelcache.policy import ModelUriError, UriPolicy

log = logging.getLogger(__name__)


class Registry(Component):
    """`store` is shared with the coordinator and closed by whoever opened it."""

    def __init__(self, bus: Bus, store: Store, *, public_url: str,
                 model_policy: UriPolicy | None = None) -> None:
        super().__init__(bus)
        self.store = store
        # The nodes' storage URI policy: a URI they would refuse is refused here, a 400.
        self.model_policy = model_policy
        self.public_url = public_url.rstrip("/")

    async def start(self) -> None:
        await self.bus.serve(ep.ADMIN_DEPLOY, self._on_deploy)
        await self.bus.serve(ep.ADMIN_DELETE, self._on_delete)
        await self.bus.serve(ep.ADMIN_LIST, self._on_list)
        await self.bus.serve(ep.ADMIN_DESCRIBE, self._on_describe)
        await self.bus.serve(ep.ADMIN_SPEC, self._on_spec)
        await self.bus.serve(ep.COLD_START, self._on_cold_start)
        await self.bus.serve(ep.ADMIN_KEY_CREATE, self._on_key_create)
        await self.bus.serve(ep.ADMIN_KEY_LIST, self._on_key_list)
        await self.bus.serve(ep.ADMIN_KEY_REVOKE, self._on_key_revoke)

    def url(self, name: str) -> str:
        return f"{self.public_url}/v2/models/{name}/infer"

    async def _on_deploy(self, msg: DeployRequest, _raw: Msg) -> ServiceStatus:
        try:
            spec = msg.spec.validate()
        except SpecError as exc:
            raise RemoteError(ErrorCode.INVALID, f"invalid service spec: {exc}") from None
        self.metrics.counter("fnplane.registry.deploys").add(1)
        if spec.storage_uri and self.model_policy is not None:
            try:
                source = self.model_policy.check(spec.storage_uri)
            except ModelUriError as exc:
                raise RemoteError(ErrorCode.INVALID, f"invalid service spec: {exc}") from None
            # Where it can be known here (a path on this machine): it must exist. A remote
            # one is checked by the node, and a failed fetch is a failed pod naming it.
            if source.scheme == "file" and not Path(source.path).exists():
                raise RemoteError(ErrorCode.INVALID, f"invalid service spec: storage URI "
                                                     f"{spec.storage_uri!r}: no such file")
        old = await self.store.get_service(spec.name)
        gen = (old.generation if old else 0) + 1
        spec = msgspec.structs.replace(spec, generation=gen)
        await self.store.put_service(spec)
        await self.bus.send(ep.SERVICE_UPDATED, SpecUpdated(spec=spec))
        if spec.prefetch:
            await self._prefetch(spec)
        log.info("registry: %s %s (generation %d)", "updated" if old else "created", spec.name, gen)
        return ServiceStatus(spec=spec, url=self.url(spec.name))

    async def _prefetch(self, spec: ServiceSpec) -> None:
        """Ask `prefetch` nodes a pod could go to (those caching it first) to fetch the
        model now; a node that cannot is logged, the deploy stands."""
        try:
            pmap: PartitionMap = await self.bus.call(ep.PARTITION_MAP_GET, Empty(), timeout=2.0)
        except RemoteError as exc:
            log.warning("registry: no partition map to prefetch %s: %s", spec.name, exc)
            return
        msg = PrefetchModel(service=spec.name, storage_uri=spec.storage_uri,
                            sha256=spec.storage_sha256)
        for node in prefetch_nodes(pmap.nodes.values(), spec):
            try:
                await self.bus.call(ep.NODE_PREFETCH, msg, timeout=2.0, node=node)
            except RemoteError as exc:
                log.warning("registry: node %s did not prefetch %s: %s", node, spec.name, exc)

    async def _on_delete(self, msg: NameRequest, _raw: Msg) -> Empty:
        if not await self.store.delete_service(msg.name):
            raise RemoteError(ErrorCode.NOT_FOUND, f"service {msg.name!r} not found")
        await self.bus.send(ep.SERVICE_DELETED, ServiceDeleted(name=msg.name))
        return Empty()

    async def _on_list(self, _msg: Empty, _raw: Msg) -> ServiceList:
        specs = await self.store.list_services()
        routes = await self._routes()
        return ServiceList(
            services=[
                ServiceStatus(spec=s, url=self.url(s.name),
                              ready_pods=len(routes.get(s.name, [])))
                for s in specs
            ]
        )

    async def _on_describe(self, msg: NameRequest, _raw: Msg) -> ServiceStatus:
        spec = await self.store.get_service(msg.name)
        if spec is None:
            raise RemoteError(ErrorCode.NOT_FOUND, f"service {msg.name!r} not found")
        scale = ScaleStatus(service=msg.name, desired=0, pods=[])
        try:
            scale = await self.bus.call(ep.SCALE_STATUS, msg, timeout=1.0,
                                        shard=shard_of(msg.name))
        except RemoteError as exc:
            log.warning("registry: scale status for %s unavailable: %s", msg.name, exc)
        ready = sum(1 for p in scale.pods if p.state == "ready")
        return ServiceStatus(
            spec=spec,
            url=self.url(spec.name),
            ready_pods=ready,
            desired_pods=scale.desired,
            pods=scale.pods,
            last_cold_start=await self.store.get_cold_start(spec.name),
            last_error=scale.last_error,
        )

    async def _on_spec(self, msg: NameRequest, _raw: Msg) -> SpecUpdated:
        spec = await self.store.get_service(msg.name)
        if spec is None:
            raise RemoteError(ErrorCode.NOT_FOUND, f"service {msg.name!r} not found")
        return SpecUpdated(spec=spec)

    async def _on_cold_start(self, msg: ColdStart, _raw: Msg) -> None:
        await self.store.put_cold_start(msg)

    # ---- API keys (kernel/apikeys.py) ------------------------------------------------------

    async def _on_key_create(self, msg: KeyCreate, _raw: Msg) -> KeyCreated:
        """A key may be made before its service is deployed (a client is often set up
        first); its service's name must be one a service could have."""
        if not is_service_name(msg.service):
            raise RemoteError(ErrorCode.INVALID, f"service name {msg.service!r}: must be a DNS "
                                                 "label (lowercase letters, digits, '-', 1-63)")
        if msg.rps < 0 or msg.burst < 0:
            raise RemoteError(ErrorCode.INVALID, "rps and burst must be >= 0 (0: no limit)")
        if msg.burst and not msg.rps:
            raise RemoteError(ErrorCode.INVALID, "a burst needs a rate (--rps)")
        stored, secret = new_key(msg.service, rps=msg.rps, burst=msg.burst, now=time.time())
        await self.store.put_key(stored)
        log.info("registry: API key %s made for %s", stored.key.id, msg.service)
        return KeyCreated(key=stored.key, secret=secret)

    async def _on_key_list(self, msg: KeyQuery, _raw: Msg) -> KeyList:
        keys = await self.store.list_keys()
        return KeyList(keys=[k for k in keys if not msg.service or k.service == msg.service])

    async def _on_key_revoke(self, msg: KeyRevoke, _raw: Msg) -> KeyList:
        """Idempotent; the record stays (revoked), so a revoked key answers 401 "revoked",
        and `key list` shows when."""
        stored = await self.store.get_key(msg.id)
        if stored is None:
            raise RemoteError(ErrorCode.NOT_FOUND, f"API key {msg.id!r} not found")
        if not stored.key.revoked_at:
            stored = msgspec.structs.replace(
                stored, key=msgspec.structs.replace(stored.key, revoked_at=time.time()))
            await self.store.put_key(stored)
        await self.bus.send(ep.KEY_REVOKED, KeyRevoked(id=msg.id))
        return KeyList(keys=[stored.key])

    async def _routes(self) -> dict[str, list[str]]:
        # Each `route` instance answers for its shards; a service's newest set wins.
        snaps: list[RoutingSnapshot] = await self.bus.gather(ep.ROUTES, Empty(), timeout=0.3)
        newest: dict[str, Endpoints] = {}
        for snap in snaps:
            for e in snap.services:
                if e.service not in newest or newest[e.service].order < e.order:
                    newest[e.service] = e
        return {s: [x.pod for x in e.endpoints] for s, e in newest.items()}

