"""The endpoint table `route` keeps: which pods of each service are ready to serve, and
whether a service has no pod because its pods fail to start. Pure; one `apply` per pod event,
returning the new endpoint set when (and only when) it changed."""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel.messages import Endpoint, Endpoints, PodEvent, PodsAnnounced, ServingMode
from kernel.shards import shard_of


@dataclass
class ServiceRoutes:
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    version: int = 0
    error: str = ""
    mode: ServingMode = "proxy"
    # Pods that served and are `unready` now: alive, withdrawn from `endpoints` until they
    # are ready again. Kept apart so their end counts as a serving pod's.
    withdrawn: dict[str, Endpoint] = field(default_factory=dict)


@dataclass
class EndpointTable:
    services: dict[str, ServiceRoutes] = field(default_factory=dict)

    def apply(self, ev: PodEvent) -> Endpoints | None:
        routes = self.services.setdefault(ev.service, ServiceRoutes())
        changed = False
        if ev.state == "unready":
            return self._withdraw(ev, routes)
        withdrawn = routes.withdrawn.pop(ev.pod, None) is not None
        if ev.state == "ready":
            if ev.pod not in routes.endpoints:
                routes.endpoints[ev.pod] = Endpoint(
                    pod=ev.pod,
                    url=ev.url,
                    node=ev.node,
                    container_concurrency=ev.container_concurrency,
                    timeline=ev.timeline,
                )
                changed = True
            if routes.error:
                routes.error, changed = "", True
        elif ev.state in ("terminating", "stopped", "failed"):
            # Removing a pod the moment it starts terminating is what keeps activators from
            # routing to deleted pods (knative/serving#16679).
            was_serving = routes.endpoints.pop(ev.pod, None) is not None
            changed = changed or was_serving
            was_serving = was_serving or withdrawn  # an unready pod had served too
            # A pod that served and died (killed, OOM) is replaced: requests waiting for it
            # wait for its replacement. Only a pod that never became ready tells them the
            # service cannot start.
            if ev.state == "failed" and not routes.endpoints and not was_serving:
                routes.error = ev.reason or "pod failed"
                if ev.log_tail:
                    routes.error += f"; last output: {ev.log_tail[-500:]}"
                changed = True
        if not changed:
            return None
        routes.version += 1
        return self.snapshot(ev.service)

    def _withdraw(self, ev: PodEvent, routes: ServiceRoutes) -> Endpoints | None:
        """A pod alive but not ready (its probe fails, its node is NotReady): no new request
        goes to it until its next `ready`. Not an error of the service."""
        serving = routes.endpoints.pop(ev.pod, None)
        routes.withdrawn[ev.pod] = serving or Endpoint(
            pod=ev.pod, url=ev.url, node=ev.node,
            container_concurrency=ev.container_concurrency, timeline=ev.timeline)
        if serving is None:
            return None
        routes.version += 1
        return self.snapshot(ev.service)

    def drop_nodes(self, nodes: set[str]) -> list[Endpoints]:
        """The coordinator reported these nodes lost: their pods serve nobody through us any
        more. The new endpoint set of every service that had a pod there."""
        changed: list[Endpoints] = []
        for service, routes in sorted(self.services.items()):
            for pod in [p for p, e in routes.withdrawn.items() if e.node in nodes]:
                del routes.withdrawn[pod]
            gone = [pod for pod, e in routes.endpoints.items() if e.node in nodes]
            if not gone:
                continue
            for pod in gone:
                del routes.endpoints[pod]
            routes.version += 1
            changed.append(self.snapshot(service))
        return changed

    def set_mode(self, service: str, mode: ServingMode) -> Endpoints | None:
        routes = self.services.setdefault(service, ServiceRoutes())
        if routes.mode == mode:
            return None
        routes.mode = mode
        routes.version += 1
        return self.snapshot(service)

    def snapshot(self, service: str) -> Endpoints:
        routes = self.services.get(service, ServiceRoutes())
        eps = sorted(routes.endpoints.values(), key=lambda e: e.pod)
        # Never direct without a pod to go to: an empty set always means the activator.
        mode = routes.mode if eps else "proxy"
        return Endpoints(service=service, version=routes.version, endpoints=eps, mode=mode,
                         error=routes.error)

    def drop(self, service: str) -> Endpoints:
        # Keep the version (not the pods): activators ignore versions they have passed, so a
        # service deployed again under this name must go on from here, not from 1.
        old = self.services.get(service, ServiceRoutes())
        self.services[service] = ServiceRoutes(version=old.version + 1)
        return self.snapshot(service)

    def restore(self, eps: Endpoints) -> None:
        self.services[eps.service] = ServiceRoutes(
            {e.pod: e for e in eps.endpoints}, eps.version, eps.error, eps.mode
        )

    def rebuild(self, shards: set[int], count: int, stored: list[Endpoints],
                answers: list[PodsAnnounced]) -> list[Endpoints]:
        """A new owner's view of `shards`: the stored snapshot, less the pods whose node
        answered without them (they ended meanwhile), plus the ready pods announced. Every
        service of the shards is returned, to be published under the new epoch (versions go
        on from the stored ones: activators order sets by (epoch, version))."""
        for eps in stored:
            old = self.services.get(eps.service)
            if old is None or old.version < eps.version:
                self.restore(eps)
        answered = {n for a in answers for n in a.nodes}
        live = {e.pod for a in answers for e in a.events}
        for service, routes in self.services.items():
            if shard_of(service, count) not in shards:
                continue
            for pod in [p for p, e in routes.endpoints.items()
                        if e.node in answered and p not in live]:
                del routes.endpoints[pod]
        for a in answers:
            for ev in a.events:
                if shard_of(ev.service, count) in shards:
                    self.apply(ev)
        out = []
        for service in sorted(self.services):
            if shard_of(service, count) in shards:
                self.services[service].version += 1
                out.append(self.snapshot(service))
        return out

    def all(self) -> list[Endpoints]:
        return [self.snapshot(s) for s in sorted(self.services)]
