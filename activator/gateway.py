"""The activator's state and its NATS side: one throttler per service, fed by `route`'s
endpoint sets and the registry's spec events; demand reported to `scale` at once when a
request waits for a service with no pod, and on every metrics tick; the first answer after a
cold start reported as a `ColdStart` record, stage by stage."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg

from activator.batcher import MicroBatcher
from activator.direct import DirectPath
from activator.proxy import PodResponse, PodUnreachable, Proxy
from activator.throttler import ServiceGone, ServiceThrottler, StartFailed
from kernel import endpoints as ep
from kernel import telemetry
from kernel.bus import Bus
from kernel.config import ActivatorConfig
from kernel.errors import RemoteError
from kernel.messages import (
    ColdStart,
    Demand,
    Empty,
    Endpoint,
    Endpoints,
    Heartbeat,
    NameRequest,
    RoutingSnapshot,
    ServiceDeleted,
    ServiceList,
    ServiceSpec,
    SpecUpdated,
)

log = logging.getLogger(__name__)

URGENT_MIN_GAP_S = 0.05


@dataclass
class Served:
    response: PodResponse
    pod: str
    cold: bool
    via_activator: bool = True


class Gateway:
    def __init__(self, nats_url: str, config: ActivatorConfig) -> None:
        self.id = f"activator-{uuid.uuid4().hex[:6]}"
        self.nats_url = nats_url
        self.config = config
        self.specs: dict[str, ServiceSpec] = {}
        self.throttlers: dict[str, ServiceThrottler] = {}
        self.endpoints: dict[str, Endpoints] = {}
        self.metrics = telemetry.Registry()
        self.proxy = Proxy(timeout_s=config.pod_timeout_s)
        self.direct = DirectPath()
        self.batchers: dict[str, MicroBatcher] = {}
        self.bus: Bus | None = None
        self._last_urgent: dict[str, float] = {}
        self._cold_reported: dict[str, int] = {}  # service → endpoints version reported
        self._reported_nonzero: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._bg: set[asyncio.Task[None]] = set()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.proxy.start()
        self.bus = bus = await Bus.connect(self.nats_url, self.id)
        await bus.serve(ep.ENDPOINTS, self._on_endpoints)
        await bus.serve(ep.SERVICE_UPDATED, self._on_spec_updated)
        await bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        await self._catch_up()
        self._tasks = [asyncio.create_task(self._report_loop(), name=f"{self.id}-metrics")]

    async def _catch_up(self) -> None:
        """A late activator learns the services and the routing snapshot it missed."""
        assert self.bus is not None
        try:
            services: ServiceList = await self.bus.call(ep.ADMIN_LIST, Empty(), timeout=2.0)
            for st in services.services:
                self._upsert(st.spec)
        except RemoteError as exc:
            log.warning("%s: no service list yet (%s); learning from events", self.id, exc)
        try:
            snap: RoutingSnapshot = await self.bus.call(ep.ROUTES, Empty(), timeout=2.0)
            for eps in snap.services:
                self._apply_endpoints(eps)
        except RemoteError as exc:
            log.warning("%s: no routing snapshot yet (%s)", self.id, exc)

    async def stop(self) -> None:
        for batcher in list(self.batchers.values()):
            await batcher.close(timeout=5.0)
        self.batchers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._bg, return_exceptions=True)
        for thr in self.throttlers.values():
            thr.fail_waiters(ServiceGone("the activator is shutting down"))
        if self.bus is not None:
            await self.bus.close()
        await self.proxy.close()

    # ---- services and endpoints ----------------------------------------------------------

    def _upsert(self, spec: ServiceSpec) -> None:
        old = self.specs.get(spec.name)
        self.specs[spec.name] = spec
        if old is None or old.batching != spec.batching:
            self._replace_batcher(spec)
        thr = self.throttlers.get(spec.name)
        if thr is None:
            self.throttlers[spec.name] = ServiceThrottler(
                spec.name,
                self.config.buffer_size,
                spec.container_concurrency,
                elsewhere=lambda pod, name=spec.name: self.direct.on_pod(name, pod),
            )
        else:
            thr.container_concurrency = spec.container_concurrency

    async def _on_spec_updated(self, msg: SpecUpdated, _raw: Msg) -> None:
        self._upsert(msg.spec)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        self.specs.pop(msg.name, None)
        self.endpoints.pop(msg.name, None)
        batcher = self.batchers.pop(msg.name, None)
        if batcher is not None:
            self._spawn(batcher.close(timeout=5.0))
        thr = self.throttlers.pop(msg.name, None)
        if thr is not None:
            thr.fail_waiters(ServiceGone(f"service {msg.name!r} was deleted"))

    async def _on_endpoints(self, msg: Endpoints, _raw: Msg) -> None:
        self._apply_endpoints(msg)

    def _apply_endpoints(self, eps: Endpoints) -> None:
        prev = self.endpoints.get(eps.service)
        if prev is not None and prev.version >= eps.version:
            return  # older than what we have (a snapshot racing a live update)
        self.endpoints[eps.service] = eps
        thr = self.throttlers.get(eps.service)
        if thr is None:
            return
        spec = self.specs.get(eps.service)
        thr.set_endpoints(eps.endpoints, spec.container_concurrency if spec else 0)
        if eps.error and not eps.endpoints:
            n = thr.fail_waiters(StartFailed(eps.error))
            if n:
                log.warning("%s: %d requests to %s failed: %s", self.id, n, eps.service, eps.error)

    async def lookup(self, name: str) -> ServiceSpec | None:
        """The spec of a service, asking the registry once when we have not heard of it
        (a deploy event may still be in flight)."""
        spec = self.specs.get(name)
        if spec is not None or self.bus is None:
            return spec
        try:
            reply: SpecUpdated = await self.bus.call(ep.ADMIN_SPEC, NameRequest(name=name),
                                                     timeout=1.0)
        except RemoteError:
            return None
        self._upsert(reply.spec)
        return reply.spec

    # ---- micro-batching -----------------------------------------------------------------

    def _replace_batcher(self, spec: ServiceSpec) -> None:
        old = self.batchers.pop(spec.name, None)
        if old is not None:
            self._spawn(old.close(timeout=5.0))
        name = spec.name

        async def send(protocol: str, payload: dict) -> tuple[int, dict]:
            """One merged request takes one pod slot, through the same path as any other."""
            path = f"/v2/models/{name}/infer" if protocol == "v2" else f"/v1/models/{name}:predict"
            body = json.dumps(payload).encode()
            headers = {"content-type": "application/json"}
            served = await self.serve(name, "POST", path, body, headers)
            try:
                return served.response.status, json.loads(served.response.body)
            except ValueError:
                return 502, {"error": f"pod answered a batch with non-JSON: "
                                      f"{served.response.body[:200]!r}"}

        batcher = MicroBatcher.for_spec(spec.batching, send)
        if batcher is not None:
            self.batchers[name] = batcher

    def batcher(self, name: str) -> MicroBatcher | None:
        return self.batchers.get(name)

    # ---- the request path ----------------------------------------------------------------

    def mode(self, name: str) -> str:
        eps = self.endpoints.get(name)
        return eps.mode if eps is not None else "proxy"

    async def serve_direct(
        self, name: str, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Served | None:
        """Straight to a pod, bypassing buffer and throttler; None when no pod has a free
        slot (or it refused the connection), so the caller takes the activator path."""
        eps = self.endpoints.get(name)
        spec = self.specs.get(name)
        thr = self.throttlers.get(name)
        if eps is None or spec is None or thr is None or eps.mode != "direct":
            return None
        target = self.direct.try_acquire(name, eps.endpoints, spec.container_concurrency,
                                         thr.busy())
        if target is None:
            return None
        t0 = time.time()
        thr.admitted += 1
        try:
            resp = await self.proxy.forward(target.url, method, path, body, headers)
        except PodUnreachable:
            return None
        finally:
            self.direct.release(name, target.pod)
            thr.dispatch()
        self.metrics.inc("fnplane.gateway.direct.count", service=name)
        self.metrics.observe(
            "fnplane.serving.invocation.duration", time.time() - t0, service=name, path="direct"
        )
        return Served(resp, target.pod, False, via_activator=False)

    async def serve(
        self, name: str, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Served:
        """Admit, wait for a pod if needed, forward; one retry on another pod if the first
        never received the request. Raises the throttler's errors for the ingress to map."""
        thr = self.throttlers[name]
        request_in = time.time()
        self.metrics.inc("fnplane.revision.request.count", service=name)
        attempts = 2
        cold_any = False
        while True:
            if thr.would_wait():
                # Scale from zero, or a burst beyond the pods we have: tell `scale` now.
                self._urgent(name, thr)
            self.metrics.set("fnplane.revision.request.queued", thr.buffered + 1, service=name)
            slot, cold = await thr.acquire(self.config.request_timeout_s)
            cold_any = cold_any or cold
            try:
                resp = await self.proxy.forward(slot.url, method, path, body, headers)
            except PodUnreachable as exc:
                thr.mark_dead(slot)
                attempts -= 1
                log.warning("%s: %s unreachable (%s); %s", self.id, slot.pod, exc,
                            "retrying" if attempts else "giving up")
                if not attempts:
                    raise
                continue
            finally:
                thr.release(slot)
            break
        if cold_any:
            self._report_cold_start(name, slot.endpoint, request_in, resp.first_byte_at)
        self.metrics.observe(
            "fnplane.serving.invocation.duration", time.time() - request_in, service=name
        )
        return Served(resp, slot.pod, cold_any)

    def _urgent(self, name: str, thr: ServiceThrottler) -> None:
        """Tell `scale` now, without waiting for the metrics tick (the cold-start path)."""
        now = time.time()
        if now - self._last_urgent.get(name, 0.0) < URGENT_MIN_GAP_S:
            return
        self._last_urgent[name] = now
        demand = Demand(
            service=name,
            reporter=self.id,
            buffered=thr.buffered + 1,
            in_flight=thr.in_flight,
            requests=thr.admitted,
            ts=now,
            urgent=True,
        )
        self._spawn(self._publish_demand(demand))

    def _report_cold_start(self, name: str, target: Endpoint, request_in: float,
                           first_byte: float) -> None:
        eps = self.endpoints.get(name)
        version = eps.version if eps else 0
        if self._cold_reported.get(name) == version:
            return
        self._cold_reported[name] = version
        tl = target.timeline
        cs = ColdStart(
            service=name, pod=target.pod, node=target.node, request_in=request_in,
            placement_decided=tl.placed_at, process_spawned=tl.spawned_at, ready=tl.ready_at,
            first_byte_out=first_byte, trace_id=telemetry.current_trace_id(),
        )
        self.metrics.observe("fnplane.cold_start.duration", first_byte - request_in, service=name)
        if self.bus is not None:
            self._spawn(self.bus.send(ep.COLD_START, cs))

    # ---- metrics to scale ----------------------------------------------------------------

    async def _publish_demand(self, demand: Demand) -> None:
        if self.bus is None:
            return
        try:
            await self.bus.send(ep.DEMAND, demand)
        except (nats.errors.Error, OSError):
            log.debug("%s: demand report lost", self.id, exc_info=True)

    async def _report_loop(self) -> None:
        """Every interval, each service with activity (and once more after it stops)."""
        interval = self.config.metrics_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for name, thr in list(self.throttlers.items()):
                in_flight = thr.in_flight + self.direct.total(name)
                busy = thr.buffered + in_flight + thr.admitted > 0
                if not busy and name not in self._reported_nonzero:
                    continue
                demand = Demand(service=name, reporter=self.id, buffered=thr.buffered,
                                in_flight=in_flight, requests=thr.admitted, ts=now)
                thr.admitted = 0
                if busy:
                    self._reported_nonzero.add(name)
                else:
                    self._reported_nonzero.discard(name)
                self.metrics.set("fnplane.revision.request.queued", thr.buffered, service=name)
                self.metrics.set("fnplane.revision.request.in_flight", thr.in_flight,
                                 service=name)
                await self._publish_demand(demand)
            if self.bus is not None:
                try:
                    await self.bus.send(
                        ep.HEARTBEAT, Heartbeat(kind="activator", instance=self.id, ts=now),
                        kind="activator",
                    )
                except (nats.errors.Error, OSError):
                    log.debug("%s: heartbeat lost", self.id, exc_info=True)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
