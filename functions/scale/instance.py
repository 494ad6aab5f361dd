"""The `scale` control function's NATS adapter: feeds demand and pod events to the per-service
cores, runs the reconcile tick, and carries out plans by asking `schedule` for placements and
nodes for stops. No decision is made here.

Sharded by service (kernel/shards.py): an instance keeps cores only for the services of the
shards the coordinator gave it. Demand arrives on per-shard subjects its owner alone
subscribes to (the busiest input: every gateway and node, every second, for every service,
so NATS filters it rather than every instance decoding it all); pod events are broadcast
anyway (`schedule` needs them for its nodes) and others' are dropped. Every action carries
the shard's epoch, so a stale owner's placements, stops and modes are refused. A new owner
rebuilds from the registry's specs and the node agents' announcement of the shard's live
pods."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.msg import Msg

from functions.scale import reclaim
from functions.scale.core import Plan, ServiceScaler, reachable_scaling, within_limit
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.config import ScaleConfig
from kernel.errors import NoResponders, RemoteError
from kernel.heartbeat import Heartbeater
from kernel.messages import (
    AnnounceRequest,
    Demand,
    Empty,
    IdlePod,
    IdlePods,
    NameRequest,
    NodesLost,
    Placement,
    PlaceRequest,
    PodEvent,
    PodsAnnounced,
    Reclaimed,
    ReclaimQuery,
    ReclaimRequest,
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
from kernel.metrics import RevisionLabels, revision_labels
from kernel.shard_owner import ShardOwnership
from kernel.shards import shard_of

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
# After stopping idle pods to make room, place again this soon (their stop takes a moment).
RECLAIM_RETRY_S = 0.5
# How long a new shard owner waits for the node agents' announcement of the shard's pods, and
# another owner's list of idle pods.
GATHER_S = 0.3


class ScaleInstance(Component):
    kind = "scale"

    def __init__(self, bus: Bus, config: ScaleConfig, *, metrics_interval_s: float = 1.0
                 ) -> None:
        super().__init__(bus)
        self.config = config
        self.metrics_interval_s = metrics_interval_s
        self.services: dict[str, ServiceScaler] = {}  # of the shards we own
        self.specs: dict[str, ServiceSpec] = {}  # every service's, for a shard we may get
        self.shards = ShardOwnership(
            bus, "scale", on_change=self._on_shards,
            per_shard=[(ep.DEMAND, self._on_demand), (ep.SCALE_STATUS, self._on_status),
                       (ep.RECLAIM, self._on_reclaim)])
        self.pod_info: dict[str, PodEvent] = {}
        self._wake = asyncio.Event()
        self._handled = 0
        # Pods being stopped to make room for another service; no more are reclaimed until
        # they are gone (each failed retry would otherwise take more).
        self._reclaiming: set[str] = set()
        self.reclaimed = 0
        self._rebuilding: set[int] = set()  # shards taken over whose pods are being gathered
        # What the gauges last showed per service: they are set on a change only, and a
        # change of desired pods is counted as a decision.
        self._shown: dict[str, tuple[int, int, bool]] = {}
        self._by_service = RevisionLabels()
        m = self.metrics
        self._m_desired = m.gauge("fnplane.revision.pods.desired")
        self._m_pods = m.gauge("fnplane.revision.pods.count")
        self._m_panic = m.gauge("fnplane.revision.panic.mode")
        self._m_decisions = m.counter("fnplane.scale.decisions")

    async def start(self) -> None:
        await self.bus.serve(ep.POD_EVENTS, self._on_pod_event)
        await self.bus.serve(ep.NODE_LOST, self._on_nodes_lost)
        await self.bus.serve(ep.SERVICE_UPDATED, self._on_spec_updated)
        await self.bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        await self.bus.serve(ep.RECLAIM_QUERY, self._on_reclaim_query)
        await self._load_services()
        await self.shards.start()
        self.tasks.spawn(self._run(), name="tick")
        self.tasks.spawn(Heartbeater(self.bus, "scale", interval_s=HEARTBEAT_S,
                                     load=self._load).run(), name="beat")

    def _load(self, elapsed_s: float) -> dict[str, float]:
        handled, self._handled = self._handled, 0
        return {"requests_per_s": handled / elapsed_s, "shards": len(self.shards.owned)}

    async def _load_services(self) -> None:
        """Services deployed before this instance started, from the registry."""
        for attempt in range(50):
            try:
                reply: ServiceList = await self.bus.call(ep.ADMIN_LIST, Empty(), timeout=1.0)
            except RemoteError:
                await asyncio.sleep(min(0.1 * (attempt + 1), 1.0))
                continue
            for st in reply.services:
                for rev in st.revisions:
                    self._upsert(rev.spec)
                self._upsert(st.spec)
            return

    def _upsert(self, spec: ServiceSpec) -> None:
        if spec.revisions:
            return  # a service with revisions runs no pods of its own: its revisions do
        try:
            # The registry validated it; a spec that reaches us otherwise (a bug, a sender
            # with the registry's credentials) must not drive pods.
            spec.validate()
        except SpecError as exc:
            log.error("%s: spec of %r refused: %s", self.id, spec.name, exc)
            return
        spec = within_limit(reachable_scaling(spec), self.config.max_scale_limit)
        self.specs[spec.name] = spec
        if not self.shards.owns(spec.name):
            return
        scaler = self.services.get(spec.name)
        if scaler is None:
            self.services[spec.name] = ServiceScaler.for_spec(spec, time.time())
        else:
            scaler.update_spec(spec)
        self._wake.set()

    # ---- shards -----------------------------------------------------------------------------

    async def _on_shards(self, gained: dict[int, int], lost: set[int]) -> None:
        count = self.shards.fence.count
        for name in [n for n in self.services if shard_of(n, count) in lost]:
            del self.services[name]
        for pod in [p for p, ev in self.pod_info.items() if shard_of(ev.service, count) in lost]:
            del self.pod_info[pod]
        if not gained:
            return
        fresh = set(gained)
        # Demand is observed from now on, but nothing is decided for these services until
        # their pods are known: a plan over no pods would start what already runs.
        self._rebuilding |= fresh
        for spec in self.specs.values():
            if shard_of(spec.name, count) in fresh:
                self._upsert(spec)
        # The previous owner's pods: every node agent says what runs of these shards.
        try:
            answers: list[PodsAnnounced] = await self.bus.gather(
                ep.NODE_ANNOUNCE, AnnounceRequest(shards=sorted(fresh), count=count),
                timeout=GATHER_S)
            for answer in answers:
                for ev in answer.events:
                    await self._on_pod_event(ev, None)
        finally:
            self._rebuilding -= fresh
        log.info("%s: took %d shard(s); %d node(s) announced %d pod(s)", self.id, len(fresh),
                 sum(len(a.nodes) for a in answers), sum(len(a.events) for a in answers))
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

    async def _on_pod_event(self, msg: PodEvent, _raw: Msg | None) -> None:
        if msg.state in ("stopped", "failed"):
            self._reclaiming.discard(msg.pod)  # ours, or one another owner stopped for us
        if not self.shards.owns(msg.service):
            return
        self._handled += 1
        scaler = self.services.get(msg.service)
        if msg.state in ("stopped", "failed"):
            self.pod_info.pop(msg.pod, None)
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
        if msg.spec.revisions and msg.spec.name in self.specs:
            # A service of an earlier release, scaled under its own name, now has revisions:
            # its first revision serves it, its own pods go.
            self._drop(msg.spec.name, "replaced by its revisions")
        self._upsert(msg.spec)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        self._drop(msg.name, "deleted")

    def _drop(self, name: str, reason: str) -> None:
        self.specs.pop(name, None)
        scaler = self.services.pop(name, None)
        epoch = self.shards.epoch(name) or 0
        if scaler is not None:
            for pod in scaler.pods.values():
                if pod.node:
                    self.tasks.spawn(self._stop_pod(name, pod.pod, pod.node, reason, epoch),
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
        if self._rebuilding and shard_of(scaler.spec.name,
                                         self.shards.fence.count) in self._rebuilding:
            return
        plan = scaler.plan(now, self.metrics_interval_s)
        self._execute(scaler, plan, now)

    def _execute(self, scaler: ServiceScaler, plan: Plan, now: float) -> None:
        epoch = self.shards.epoch(plan.service)
        if epoch is None:
            return  # the shard moved on; its new owner acts
        self._show(scaler, plan)

        if plan.mode_change is not None:
            ebc = plan.decision.excess_burst_capacity if plan.decision else -1.0
            mode = ServiceMode(service=plan.service, mode=plan.mode_change,
                               excess_burst_capacity=ebc, epoch=epoch)
            self.tasks.spawn(self.bus.send(ep.SERVICE_MODE, mode), name=f"mode-{plan.service}")
        for _ in range(plan.start):
            pod = f"{plan.service}-{uuid.uuid4().hex[:8]}"
            scaler.placing(pod, now)
            self.tasks.spawn(self._place(scaler, pod, now, epoch), name=f"place-{pod}")
        for victim in plan.stop:
            self.tasks.spawn(
                self._stop_pod(plan.service, victim.pod, victim.node, "scale-down", epoch),
                name=f"stop-{victim.pod}",
            )

    def _show(self, scaler: ServiceScaler, plan: Plan) -> None:
        """Desired vs actual pods and panic mode, as gauges; set only when they change."""
        shown = (plan.desired, scaler.counts()[1], bool(plan.decision and plan.decision.panic))
        before = self._shown.get(plan.service)
        if shown == before:
            return
        self._shown[plan.service] = shown
        attrs = self._by_service[plan.service]
        self._m_desired.set(shown[0], attrs)
        self._m_pods.set(shown[1], attrs)
        self._m_panic.set(int(shown[2]), attrs)
        was = before[0] if before is not None else 0
        if shown[0] != was:
            direction = "up" if shown[0] > was else "down"
            self._m_decisions.add(1, revision_labels(plan.service, direction=direction))

    async def _place(self, scaler: ServiceScaler, pod: str, requested_at: float,
                     epoch: int) -> None:
        spec = scaler.spec
        req = PlaceRequest(pod=pod, spec=spec, requested_at=requested_at, epoch=epoch)
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
            await self._make_room(scaler, now)

    def _idle(self, now: float, but: ServiceScaler | None = None) -> list[IdlePod]:
        """Idle pods of our shards' services that could make room (reclaim.py's rules)."""
        return [
            IdlePod(pod=p.pod, service=name, node=p.node, resources=other.spec.resources,
                    idle_since=other.autoscaler.last_active)
            for name, other in self.services.items() if other is not but
            for p in other.reclaimable(now, self.metrics_interval_s)
        ]

    async def _make_room(self, scaler: ServiceScaler, now: float) -> None:
        """Stop idle pods of other services so the waiting one fits (functions/scale/
        reclaim.py decides which). Idle pods of other shards are their owners': we ask them
        for their lists, and ask the owner of each victim to stop it."""
        if self._reclaiming:
            scaler.retry_soon(now, RECLAIM_RETRY_S)  # room is on its way
            return
        idle = self._idle(now, but=scaler)
        others = self.shards.owners() - {self.id}
        if others:
            answers: list[IdlePods] = await self.bus.gather(
                ep.RECLAIM_QUERY, ReclaimQuery(asker=self.id), timeout=GATHER_S,
                done=lambda a: len({x.owner for x in a} - {self.id}) >= len(others))
            idle += [p for a in answers if a.owner != self.id for p in a.pods]
        candidates = [reclaim.Candidate(pod=p.pod, service=p.service, node=p.node,
                                        resources=p.resources, idle_since=p.idle_since)
                      for p in idle]
        victims = reclaim.pick(scaler.spec.resources, candidates)
        theirs: dict[str, list[str]] = {}
        for v in victims:
            log.warning("%s: stopping idle pod %s of %s to make room for %s", self.id, v.pod,
                        v.service, scaler.spec.name)
            self._reclaiming.add(v.pod)
            self.reclaimed += 1
            if v.service in self.services:
                self.services[v.service].reclaim(v.pod)
                self.tasks.spawn(self._stop_pod(v.service, v.pod, v.node, "reclaimed",
                                                self.shards.epoch(v.service) or 0),
                                 name=f"stop-{v.pod}")
            else:
                theirs.setdefault(v.service, []).append(v.pod)
        for service, pods in theirs.items():
            self.tasks.spawn(self._ask_reclaim(service, pods, scaler.spec.name),
                             name=f"reclaim-{service}")
        if victims:
            scaler.retry_soon(now, RECLAIM_RETRY_S)

    async def _ask_reclaim(self, service: str, pods: list[str], for_service: str) -> None:
        """The owner of `service`'s shard stops those of `pods` still idle (it alone may)."""
        try:
            reply: Reclaimed = await self.bus.call(
                ep.RECLAIM, ReclaimRequest(pods=pods, for_service=for_service),
                timeout=2.0, shard=shard_of(service, self.shards.fence.count))
            refused = set(pods) - set(reply.pods)
        except RemoteError as exc:
            log.warning("%s: reclaiming %s of %s: %s", self.id, pods, service, exc)
            refused = set(pods)
        self._reclaiming.difference_update(refused)  # their room is not coming

    async def _on_reclaim_query(self, msg: ReclaimQuery, _raw: Msg) -> IdlePods | None:
        if msg.asker == self.id:
            return None
        return IdlePods(owner=self.id, pods=self._idle(time.time()))

    async def _on_reclaim(self, msg: ReclaimRequest, _raw: Msg) -> Reclaimed:
        now = time.time()
        idle = {p.pod: p for p in self._idle(now)}
        stopping: list[str] = []
        for pod in msg.pods:
            p = idle.get(pod)
            if p is None:
                continue  # busy again, gone, or not ours any more
            log.warning("%s: stopping idle pod %s of %s to make room for %s (asked)", self.id,
                        pod, p.service, msg.for_service)
            self.services[p.service].reclaim(pod)
            self.reclaimed += 1
            stopping.append(pod)
            self.tasks.spawn(self._stop_pod(p.service, pod, p.node, "reclaimed",
                                            self.shards.epoch(p.service) or 0),
                             name=f"stop-{pod}")
        return Reclaimed(pods=stopping)

    async def _stop_pod(self, service: str, pod: str, node: str, reason: str,
                        epoch: int) -> None:
        try:
            await self.bus.call(
                ep.NODE_STOP, StopPod(pod=pod, service=service, reason=reason, epoch=epoch),
                timeout=15.0, node=node,
            )
        except RemoteError as exc:
            log.warning("%s: stopping %s on %s: %s", self.id, pod, node, exc)
            self._reclaiming.discard(pod)  # its room is not coming
