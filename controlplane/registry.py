"""The service registry behind the admin API the CLI talks to (`fnplane.admin.*` on NATS).

Specs are validated here, once, and stored in Redis before anyone hears of them, so a spec
that was acknowledged survives a restart. Every change is announced on the service event
subject; status answers gather what `scale` and `route` know at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel import revisions as rv
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
    PodEvent,
    PrefetchModel,
    RevisionStatus,
    RoutingSnapshot,
    ScaleStatus,
    ServiceDeleted,
    ServiceList,
    ServiceSpec,
    ServiceStatus,
    SpecError,
    SpecUpdated,
    TrafficRequest,
    TrafficTarget,
)
from kernel.metrics import SERVICE
from kernel.shards import shard_of
from kernel.store import Store
from partitions.modelcache.placement import prefetch_nodes
from partitions.modelcache.policy import ModelUriError, UriPolicy

log = logging.getLogger(__name__)


class Registry(Component):
    """`store` is shared with the coordinator and closed by whoever opened it."""

    def __init__(self, bus: Bus, store: Store, *, public_url: str,
                 model_policy: UriPolicy | None = None, revision_history: int = 10) -> None:
        super().__init__(bus)
        self.store = store
        # Revisions kept per service beyond those traffic names (Knative's GC keeps a few
        # unrouted ones for rollback; a routed one is never retired).
        self.revision_history = max(1, revision_history)
        self._ready: set[str] = set()  # revisions known to have had a ready pod
        # The nodes' storage URI policy: a URI they would refuse is refused here, a 400.
        self.model_policy = model_policy
        self.public_url = public_url.rstrip("/")

    async def start(self) -> None:
        await self.bus.serve(ep.ADMIN_DEPLOY, self._on_deploy)
        await self.bus.serve(ep.ADMIN_TRAFFIC, self._on_traffic)
        await self.bus.serve(ep.ADMIN_DELETE, self._on_delete)
        await self.bus.serve(ep.POD_EVENTS, self._on_pod_event)
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
        if len(rv.revision_name(spec.name, 1)) > 63:
            raise RemoteError(ErrorCode.INVALID, f"invalid service spec: name {spec.name!r} is "
                              "over 57 characters: its revisions' names (NAME-0000N) would "
                              "not be DNS labels")
        if rv.parent_of(spec.name):
            raise RemoteError(ErrorCode.INVALID, f"invalid service spec: name {spec.name!r} "
                              "ends in -NNNNN, which names revisions (NAME-0000N)")
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
        # Everything is decided (and may be refused) before anything is stored: bad
        # traffic or tags change nothing.
        revisions = list(old.revisions) if old else []
        revision = None
        latest = old.latest_revision if old else ""
        if rv.creates_revision(old, spec):
            revision = rv.revision_spec(spec, rv.revision_number(latest) + 1)
            latest = revision.name
            revisions.append(latest)
        current = old.traffic if old else []
        if msg.traffic is not None:
            traffic = rv.split(spec.name, msg.traffic, revisions=revisions, latest=latest,
                               current=current)
        elif msg.canary_percent is not None:
            traffic = rv.canary(spec.name, msg.canary_percent, revisions=revisions,
                                latest=latest, current=current)
        else:
            traffic = rv.follow_latest(current, latest)
        if msg.tags:
            traffic = rv.retag(spec.name, traffic, msg.tags, revisions=revisions, latest=latest)
        gen = (old.generation if old else 0) + 1
        spec = await self._commit(
            msgspec.structs.replace(spec, generation=gen, promoted=old.promoted if old else []),
            revisions, latest, traffic, revision)
        if spec.prefetch:
            await self._prefetch(spec)
        log.info("registry: %s %s (generation %d, %s, traffic %s)",
                 "updated" if old else "created", spec.name, gen,
                 f"new revision {latest}" if revision else "no new revision",
                 _show(spec.traffic))
        return ServiceStatus(spec=spec, url=self.url(spec.name))

    async def _on_traffic(self, msg: TrafficRequest, _raw: Msg) -> ServiceStatus:
        old = await self.store.get_service(msg.name)
        if old is None:
            raise RemoteError(ErrorCode.NOT_FOUND, f"service {msg.name!r} not found")
        if not old.revisions:
            raise RemoteError(ErrorCode.CONFLICT, f"service {msg.name!r} has no revisions")
        kw = {"revisions": old.revisions, "latest": old.latest_revision}
        if msg.rollback:
            traffic = rv.rollback(msg.name, old.traffic, old.promoted, old.revisions)
        elif msg.traffic is not None:
            traffic = rv.split(msg.name, msg.traffic, current=old.traffic, **kw)
        elif msg.tags:
            traffic = old.traffic
        else:
            raise RemoteError(ErrorCode.INVALID, "nothing to change: give traffic or tags")
        if msg.tags:
            traffic = rv.retag(msg.name, traffic, msg.tags, **kw)
        spec = await self._commit(
            msgspec.structs.replace(old, generation=old.generation + 1),
            list(old.revisions), old.latest_revision, traffic, None)
        self.metrics.counter("fnplane.registry.traffic.changes").add(
            1, {SERVICE: msg.name, "rollback": str(msg.rollback).lower()})
        log.info("registry: traffic of %s now %s%s", msg.name, _show(spec.traffic),
                 " (rollback)" if msg.rollback else "")
        return await self._describe(spec)

    async def _commit(self, spec: ServiceSpec, revisions: list[str], latest: str,
                      traffic: list[TrafficTarget], revision: ServiceSpec | None
                      ) -> ServiceSpec:
        """Store the service with its new block (and new revision, retiring what the
        bounded history drops), then announce: every live revision as `scale` must run it
        (reachable or not, current scaling), then the service, then the retired ones
        deleted — so an activator knows a revision before a split names it."""
        retired = rv.retire(revisions, traffic, latest=latest, keep=self.revision_history)
        revisions = [r for r in revisions if r not in retired]
        promoted = rv.promote([p for p in spec.promoted if p in revisions], traffic,
                              keep=self.revision_history)
        spec = msgspec.structs.replace(spec, revisions=revisions, latest_revision=latest,
                                       traffic=traffic, promoted=promoted)
        await self.store.put_service_with_revision(spec, revision, retired)
        stored = await self.store.get_revisions(spec.name)
        for name in revisions:
            if name in stored:
                await self.bus.send(ep.SERVICE_UPDATED,
                                    SpecUpdated(spec=rv.effective(stored[name], spec)))
        await self.bus.send(ep.SERVICE_UPDATED, SpecUpdated(spec=spec))
        for name in retired:
            log.info("registry: revision %s retired (history of %d)", name,
                     self.revision_history)
            await self.bus.send(ep.SERVICE_DELETED, ServiceDeleted(name=name))
        return spec

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg) -> None:
        """A revision's first ready pod makes it Ready for good (as Knative's condition,
        kept at zero pods): what `fnplane list` shows as the latest ready revision."""
        if msg.state != "ready" or msg.service in self._ready or not rv.parent_of(msg.service):
            return
        self._ready.add(msg.service)
        await self.store.mark_ready(msg.service)

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
        spec = await self.store.get_service(msg.name)
        if not await self.store.delete_service(msg.name):
            raise RemoteError(ErrorCode.NOT_FOUND, f"service {msg.name!r} not found")
        for rev in spec.revisions if spec else []:
            self._ready.discard(rev)
            await self.bus.send(ep.SERVICE_DELETED, ServiceDeleted(name=rev))
        await self.bus.send(ep.SERVICE_DELETED, ServiceDeleted(name=msg.name))
        return Empty()

    async def _on_list(self, _msg: Empty, _raw: Msg) -> ServiceList:
        """Services with their revisions as `scale` runs them (a late `scale` or activator
        learns both from this one answer)."""
        specs = await self.store.list_services()
        routes = await self._routes()
        out = []
        for s in specs:
            revs = await self._revision_statuses(s, routes)
            ready = (sum(r.ready_pods for r in revs) if s.revisions
                     else len(routes.get(s.name, [])))
            out.append(ServiceStatus(spec=s, url=self.url(s.name), ready_pods=ready,
                                     revisions=revs,
                                     latest_ready_revision=_latest_ready(revs)))
        return ServiceList(services=out)

    async def _revision_statuses(self, spec: ServiceSpec, routes: dict[str, list[str]],
                                 scales: dict[str, ScaleStatus] | None = None
                                 ) -> list[RevisionStatus]:
        if not spec.revisions:
            return []
        stored = await self.store.get_revisions(spec.name)
        ready = await self.store.ready_revisions(spec.revisions)
        self._ready |= ready
        share = rv.percents(spec.traffic)
        out = []
        for name in spec.revisions:
            if name not in stored:
                continue
            scale = (scales or {}).get(name)
            pods = (sum(1 for p in scale.pods if p.state == "ready") if scale
                    else len(routes.get(name, [])))
            out.append(RevisionStatus(
                spec=rv.effective(stored[name], spec), percent=share.get(name, 0),
                tags=[t.tag for t in spec.traffic if t.revision == name and t.tag],
                ready_pods=pods, desired_pods=scale.desired if scale else 0,
                ready=name in ready or pods > 0,
                last_error=scale.last_error if scale else ""))
        return out

    async def _scale_status(self, name: str) -> ScaleStatus:
        try:
            return await self.bus.call(ep.SCALE_STATUS, NameRequest(name=name), timeout=1.0,
                                       shard=shard_of(name))
        except RemoteError as exc:
            log.warning("registry: scale status for %s unavailable: %s", name, exc)
            return ScaleStatus(service=name, desired=0, pods=[])

    async def _on_describe(self, msg: NameRequest, _raw: Msg) -> ServiceStatus:
        spec = await self.store.get_service(msg.name)
        if spec is None:
            raise RemoteError(ErrorCode.NOT_FOUND, f"service {msg.name!r} not found")
        return await self._describe(spec)

    async def _describe(self, spec: ServiceSpec) -> ServiceStatus:
        """A service with revisions sums its revisions' pods; each revision's own state
        (share, tags, pods, why it cannot start) is in `revisions`."""
        names = spec.revisions or [spec.name]
        scales = dict(zip(names, await asyncio.gather(*(self._scale_status(n) for n in names)),
                          strict=True))
        revs = await self._revision_statuses(spec, {}, scales)
        pods = [p for s in scales.values() for p in s.pods]
        colds = [c for c in [await self.store.get_cold_start(n) for n in names] if c]
        errors = [f"{n}: {s.last_error}" if spec.revisions else s.last_error
                  for n, s in scales.items() if s.last_error]
        return ServiceStatus(
            spec=spec,
            url=self.url(spec.name),
            ready_pods=sum(1 for p in pods if p.state == "ready"),
            desired_pods=sum(s.desired for s in scales.values()),
            pods=pods,
            last_cold_start=max(colds, key=lambda c: c.request_in, default=None),
            last_error="; ".join(errors),
            revisions=revs,
            latest_ready_revision=_latest_ready(revs),
        )

    async def _on_spec(self, msg: NameRequest, _raw: Msg) -> SpecUpdated:
        """A service's spec, or a revision's as `scale` runs it (a node agent or an
        activator meeting a pod's or a split's revision)."""
        spec = await self.store.get_service(msg.name)
        if spec is None and (parent := rv.parent_of(msg.name)):
            service = await self.store.get_service(parent)
            revision = await self.store.get_revision(parent, msg.name)
            if service is not None and revision is not None:
                return SpecUpdated(spec=rv.effective(revision, service))
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



def _latest_ready(revisions: list[RevisionStatus]) -> str:
    return next((r.spec.name for r in reversed(revisions) if r.ready), "")


def _show(traffic: list[TrafficTarget]) -> str:
    return ", ".join(f"{t.revision}={t.percent}%" + (f" ({t.tag})" if t.tag else "")
                     for t in traffic)
