"""The `scale` control function's NATS adapter: feeds demand and pod events to the per-service
cores, runs the reconcile tick, and carries out plans by asking `schedule` for placements and
nodes for stops. No decision is made here."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.msg import Msg

from functions.scale import reclaim
from functions.scale.core import Plan, ServiceScaler, within_limit
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.config import ScaleConfig
from kernel.errors import NoResponders, RemoteError
from kernel.heartbeat import Heartbeater
from kernel.messages import (
    Demand,
    Empty,
    NameRequest,
    NodesLost,
    Placement,
    PlaceRequest,
    PodEvent,
    ScaleStatus,
    ServiceDeleted,
    ServiceList,
    ServiceMode,
    ServiceSpec,
    SpecError,
    SpecUpdated,
    StopPod,
    Unschedulable,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
# After stopping idle pods to make room, place again this soon (their stop takes a moment).
RECLAIM_RETRY_S = 0.5


class ScaleInstance(Component):
    kind = "scale"

    def __init__(self, bus: Bus, config: ScaleConfig, *, metrics_interval_s: float = 1.0
                 ) -> None:
        super().__init__(bus)
        self.config = config
        self.metrics_interval_s = metrics_interval_s
        self.services: dict[str, ServiceScaler] = {}
        self.pod_info: dict[str, PodEvent] = {}
        self._wake = asyncio.Event()
        self._handled = 0
        # Pods being stopped to make room for another service; no more are reclaimed until
        # they are gone (each failed retry would otherwise take more).
        self._reclaiming: set[str] = set()
        self.reclaimed = 0

    async def start(self) -> None:
        await self.bus.serve(ep.DEMAND, self._on_demand)
        await self.bus.serve(ep.POD_EVENTS, self._on_pod_event)
        await self.bus.serve(ep.NODE_LOST, self._on_nodes_lost)
        await self.bus.serve(ep.SERVICE_UPDATED, self._on_spec_updated)
        await self.bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        await self.bus.serve(ep.SCALE_STATUS, self._on_status)
        await self._load_services()
        self.tasks.spawn(self._run(), name="tick")
        self.tasks.spawn(Heartbeater(self.bus, "scale", interval_s=HEARTBEAT_S,
                                     load=self._load).run(), name="beat")

    def _load(self, elapsed_s: float) -> dict[str, float]:
        handled, self._handled = self._handled, 0
        return {"requests_per_s": handled / elapsed_s}

    async def _load_services(self) -> None:
        """Services deployed before this instance started, from the registry."""
        for attempt in range(50):
            try:
                reply: ServiceList = await self.bus.call(ep.ADMIN_LIST, Empty(), timeout=1.0)
            except RemoteError:
                await asyncio.sleep(min(0.1 * (attempt + 1), 1.0))
                continue
            for st in reply.services:
                self._upsert(st.spec)
            return

    def _upsert(self, spec: ServiceSpec) -> None:
        try:
            # The registry validated it; a spec that reaches us otherwise (a bug, a sender
            # with the registry's credentials) must not drive pods.
            spec.validate()
        except SpecError as exc:
            log.error("%s: spec of %r refused: %s", self.id, spec.name, exc)
            return
        spec = within_limit(spec, self.config.max_scale_limit)
        scaler = self.services.get(spec.name)
        if scaler is None:
            self.services[spec.name] = ServiceScaler.for_spec(spec, time.time())
        else:
            scaler.update_spec(spec)
        self._wake.set()

    # ---- inputs ---------------------------------------------------------------------------

    async def _on_demand(self, msg: Demand, _raw: Msg) -> None:
        scaler = self.services.get(msg.service)
        if scaler is None:
            return
        scaler.observe(msg)
        self._handled += 1
        if msg.urgent:
            # Requests are waiting (at zero, or beyond the ready pods): decide now rather
            # than at the next tick. Activators rate-limit urgent reports per service.
            self._reconcile(scaler, time.time())

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg) -> None:
        scaler = self.services.get(msg.service)
        if msg.state in ("stopped", "failed"):
            self.pod_info.pop(msg.pod, None)
            self._reclaiming.discard(msg.pod)
        else:
            self.pod_info[msg.pod] = msg
        if scaler is not None:
            scaler.on_pod_event(msg, time.time())
            if msg.state in ("failed", "stopped"):
                self._wake.set()

    async def _on_nodes_lost(self, msg: NodesLost, _raw: Msg) -> None:
        """Pods on nodes that left the map are gone: forget them, and replace them at once."""
        lost = set(msg.nodes)
        for name, scaler in self.services.items():
            if gone := scaler.nodes_lost(lost):
                log.warning("%s: %s lost %d pod(s) on %s; replacing them", self.id, name,
                            len(gone), ", ".join(sorted(lost)[:5]))
        for pod in [p for p, ev in self.pod_info.items() if ev.node in lost]:
            del self.pod_info[pod]
            self._reclaiming.discard(pod)
        self._wake.set()

    async def _on_spec_updated(self, msg: SpecUpdated, _raw: Msg) -> None:
        self._upsert(msg.spec)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        scaler = self.services.pop(msg.name, None)
        if scaler is not None:
            for pod in scaler.pods.values():
                if pod.node:
                    self.tasks.spawn(self._stop_pod(msg.name, pod.pod, pod.node, "deleted"),
                                     name=f"stop-{pod.pod}")

    async def _on_status(self, msg: NameRequest, _raw: Msg) -> ScaleStatus:
        scaler = self.services.get(msg.name)
        if scaler is None:
            return ScaleStatus(service=msg.name, desired=0, pods=[])
        pods = [self.pod_info[p] for p in scaler.pods if p in self.pod_info]
        return ScaleStatus(service=msg.name, desired=scaler.desired, pods=pods,
                           last_error=scaler.last_error)

    # ---- the tick -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.tick_s)
            except TimeoutError:
                pass
            self._wake.clear()
            now = time.time()
            for scaler in list(self.services.values()):
                self._reconcile(scaler, now)

    def _reconcile(self, scaler: ServiceScaler, now: float) -> None:
        plan = scaler.plan(now, self.metrics_interval_s)
        self._execute(scaler, plan, now)

    def _execute(self, scaler: ServiceScaler, plan: Plan, now: float) -> None:
        if plan.mode_change is not None:
            ebc = plan.decision.excess_burst_capacity if plan.decision else -1.0
            mode = ServiceMode(service=plan.service, mode=plan.mode_change,
                               excess_burst_capacity=ebc)
            self.tasks.spawn(self.bus.send(ep.SERVICE_MODE, mode), name=f"mode-{plan.service}")
        for _ in range(plan.start):
            pod = f"{plan.service}-{uuid.uuid4().hex[:8]}"
            scaler.placing(pod, now)
            self.tasks.spawn(self._place(scaler, pod, now), name=f"place-{pod}")
        for victim in plan.stop:
            self.tasks.spawn(
                self._stop_pod(plan.service, victim.pod, victim.node, "scale-down"),
                name=f"stop-{victim.pod}",
            )

    async def _place(self, scaler: ServiceScaler, pod: str, requested_at: float) -> None:
        spec = scaler.spec
        req = PlaceRequest(pod=pod, spec=spec, requested_at=requested_at)
        deadline = time.monotonic() + self.config.place_timeout_s
        said_no_room = False  # schedule answered: no node has room (not: nobody answered)
        while True:
            try:
                reply: Placement | Unschedulable = await self.bus.call(
                    ep.PLACE, req, timeout=self.config.place_timeout_s
                )
                said_no_room = type(reply) is Unschedulable
            except NoResponders:
                # No `schedule` instance owns a partition right now (start-up, a partition
                # changing hands): that passes within moments, so wait rather than fail.
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    continue
                reply = Unschedulable(pod=pod, service=spec.name,
                                      reason="no schedule instance owns a partition")
            except RemoteError as exc:
                reply = Unschedulable(pod=pod, service=spec.name,
                                      reason=f"placement failed: {exc.message}")
            break
        if type(reply) is Placement:
            scaler.placed(pod, reply.node)
            return
        reason = reply.reason
        log.warning("%s: pod %s of %s not placed: %s", self.id, pod, spec.name, reason)
        now = time.time()
        # Requests waiting for it stay in the activators (until their own timeout) while
        # placement is retried, as Knative leaves them with an unschedulable pod.
        scaler.placement_failed(pod, reason, now)
        if said_no_room and scaler.waiting(now, self.metrics_interval_s):
            self._make_room(scaler, now)

    def _make_room(self, scaler: ServiceScaler, now: float) -> None:
        """Stop idle pods of other services so the waiting one fits (functions/scale/
        reclaim.py decides which)."""
        if self._reclaiming:
            scaler.retry_soon(now, RECLAIM_RETRY_S)  # room is on its way
            return
        candidates = [
            reclaim.Candidate(pod=p.pod, service=name, node=p.node,
                              resources=other.spec.resources,
                              idle_since=other.autoscaler.last_active)
            for name, other in self.services.items() if other is not scaler
            for p in other.reclaimable(now, self.metrics_interval_s)
        ]
        victims = reclaim.pick(scaler.spec.resources, candidates)
        for v in victims:
            log.warning("%s: stopping idle pod %s of %s to make room for %s", self.id, v.pod,
                        v.service, scaler.spec.name)
            self.services[v.service].reclaim(v.pod)
            self._reclaiming.add(v.pod)
            self.reclaimed += 1
            self.tasks.spawn(self._stop_pod(v.service, v.pod, v.node, "reclaimed"),
                             name=f"stop-{v.pod}")
        if victims:
            scaler.retry_soon(now, RECLAIM_RETRY_S)

    async def _stop_pod(self, service: str, pod: str, node: str, reason: str) -> None:
        try:
            await self.bus.call(
                ep.NODE_STOP, StopPod(pod=pod, service=service, reason=reason), timeout=15.0,
                node=node,
            )
        except RemoteError as exc:
            log.warning("%s: stopping %s on %s: %s", self.id, pod, node, exc)
            self._reclaiming.discard(pod)  # its room is not coming
