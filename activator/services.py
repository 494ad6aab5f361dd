"""The activator's service table: per service, its spec, its current endpoint set (with the
mode `route` chose), its throttler and its micro-batcher. Kept current by `sync.py` from the
registry's spec events and `route`'s endpoint sets; read by the request handler. No I/O."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from activator.batcher import MicroBatcher
from activator.direct import DirectPath
from activator.throttler import ServiceGone, ServiceThrottler, StartFailed
from activator.workers import ALONE, Worker
from kernel.messages import Endpoints, ServiceSpec, ServingMode
from kernel.versions import plausible

log = logging.getLogger(__name__)

BatcherFactory = Callable[[ServiceSpec], MicroBatcher | None]


@dataclass
class Service:
    spec: ServiceSpec
    throttler: ServiceThrottler
    endpoints: Endpoints | None = None
    batcher: MicroBatcher | None = None

    @property
    def mode(self) -> ServingMode:
        return self.endpoints.mode if self.endpoints is not None else "proxy"

    @property
    def failed(self) -> bool:
        """Its pods fail to start (`route` says so): a split gives it no traffic."""
        eps = self.endpoints
        return eps is not None and bool(eps.error) and not eps.endpoints


class ServiceTable:
    def __init__(self, *, buffer_size: int, direct: DirectPath, worker: Worker = ALONE) -> None:
        self.buffer_size = worker.buffer(buffer_size)
        self.direct = direct
        self.worker = worker
        # Set by whoever sends batches (the request handler): a batch takes the same path
        # as one request.
        self.make_batcher: BatcherFactory = lambda _spec: None
        self._services: dict[str, Service] = {}
        # Services with revisions: what clients call; their revisions are in `_services`.
        self._routers: dict[str, ServiceSpec] = {}
        # Endpoint sets that arrived before their service's spec (events race).
        self._early: dict[str, Endpoints] = {}

    def get(self, name: str) -> Service | None:
        return self._services.get(name)

    def router(self, name: str) -> ServiceSpec | None:
        """The spec of a service with revisions (its traffic block), if `name` is one."""
        return self._routers.get(name)

    def __getitem__(self, name: str) -> Service:
        return self._services[name]

    def __contains__(self, name: str) -> bool:
        return name in self._services or name in self._routers

    def __iter__(self) -> Iterator[Service]:
        return iter(list(self._services.values()))

    def names(self) -> list[str]:
        """The names clients call: services, not their revisions."""
        return [n for n, s in self._services.items() if not s.spec.revision_of] + list(
            self._routers)

    def front(self, name: str) -> Service | None:
        """Who answers for `name` where one revision must (the event stream's room and lag):
        the service itself, or its revision with the largest share that can start."""
        router = self._routers.get(name)
        if router is None:
            return self._services.get(name)
        shares = sorted(((t.percent, t.revision) for t in router.traffic if t.percent),
                        reverse=True)
        revs = [svc for _, r in shares if (svc := self._services.get(r)) is not None]
        return next((svc for svc in revs if not svc.failed), revs[0] if revs else None)

    def upsert(self, spec: ServiceSpec) -> MicroBatcher | None:
        """Add or update a service; returns a batcher it replaced, for the caller to close.
        A service with revisions only routes: its revisions get the throttlers."""
        if spec.revisions:
            self._routers[spec.name] = spec
            # A service of an earlier release had pods under its own name: they go (scale
            # stops them), its revisions serve it from now on.
            old = self._services.pop(spec.name, None)
            if old is not None:
                old.throttler.fail_waiters(ServiceGone(f"service {spec.name!r} now has "
                                                       "revisions; retry"))
            return old.batcher if old is not None else None
        svc = self._services.get(spec.name)
        if svc is None:
            thr = ServiceThrottler(
                spec.name, self.buffer_size, spec.container_concurrency,
                elsewhere=lambda pod, name=spec.name: self.direct.on_pod(name, pod),
                worker=self.worker,
            )
            svc = self._services[spec.name] = Service(spec, thr, batcher=self.make_batcher(spec))
            early = self._early.pop(spec.name, None)
            if early is not None:
                self.apply_endpoints(early)
            return None
        old_spec, svc.spec = svc.spec, spec
        svc.throttler.container_concurrency = spec.container_concurrency
        if old_spec.batching == spec.batching:
            return None
        retired, svc.batcher = svc.batcher, self.make_batcher(spec)
        return retired

    def remove(self, name: str) -> Service | None:
        """A deleted service: its waiting requests fail at once; the caller closes the
        batcher of the returned entry."""
        self._early.pop(name, None)
        self._routers.pop(name, None)
        svc = self._services.pop(name, None)
        if svc is not None:
            svc.throttler.fail_waiters(ServiceGone(f"service {name!r} was deleted"))
        return svc

    def apply_endpoints(self, eps: Endpoints) -> int:
        """Take a newer endpoint set; returns how many waiting requests it failed (a service
        whose pods fail to start has no endpoints and an error). Sets order by (epoch,
        version): a new `route` owner's epoch is higher, whatever its version."""
        svc = self._services.get(eps.service)
        if svc is None:
            prev = self._early.get(eps.service)
            if prev is None or prev.order < eps.order:
                self._early[eps.service] = eps
            return 0
        if svc.endpoints is not None and svc.endpoints.order >= eps.order:
            return 0  # older than what we have (a snapshot racing a live update)
        if svc.endpoints is not None and not (
                plausible(svc.endpoints.epoch, eps.epoch)
                and plausible(svc.endpoints.version, eps.version)):
            log.error("endpoints %s of %s refused: implausible after %s", eps.order,
                      eps.service, svc.endpoints.order)
            return 0
        svc.endpoints = eps
        svc.throttler.set_endpoints(eps.endpoints, svc.spec.container_concurrency)
        if eps.error and not eps.endpoints:
            return svc.throttler.fail_waiters(StartFailed(eps.error))
        return 0

    def take_batchers(self) -> list[MicroBatcher]:
        """Shutting down: the batchers, for the caller to close (flushing what they hold)."""
        batchers = [svc.batcher for svc in self._services.values() if svc.batcher is not None]
        for svc in self._services.values():
            svc.batcher = None
        return batchers

    def fail_all(self, why: str) -> None:
        """Shutting down: every request still waiting for a pod gets `why`."""
        for svc in self._services.values():
            svc.throttler.fail_waiters(ServiceGone(why))
