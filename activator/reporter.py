"""What the activator tells the control plane: demand to `scale` at once when a request waits
for a service with no free pod (rate-limited per service), and on every metrics tick for
each service with activity (then one last zero); the first answer after a cold start as a
`ColdStart` record, stage by stage; and its heartbeat."""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors

from activator.direct import DirectPath
from activator.services import ServiceTable
from kernel import endpoints as ep
from kernel import telemetry
from kernel.bus import Bus
from kernel.messages import ColdStart, Demand, Endpoint, Heartbeat
from kernel.metrics import SERVICE, LabelCache, Metrics
from kernel.shards import shard_of
from kernel.tasks import TaskGroup

log = logging.getLogger(__name__)

URGENT_MIN_GAP_S = 0.05
# ColdStart.stages_ms's keys → the `stage` label of fnplane.cold_start.stage.duration.
STAGES = {"request_in->placement_decided": "placement",
          "placement_decided->weights_fetched": "weights_fetch",
          "weights_fetched->process_spawned": "spawn",
          "process_spawned->ready": "ready",
          "ready->first_byte_out": "first_byte"}


def cold_start_stages(cs: ColdStart) -> dict[str, float]:
    """Seconds per stage; stages whose timestamps the pod did not report are left out
    (weights_fetch is 0, not absent, when there was nothing to fetch)."""
    return {STAGES[k]: v / 1000.0 for k, v in cs.stages_ms().items()
            if k in STAGES and (v or k == "placement_decided->weights_fetched")}


class DemandReporter:
    def __init__(
        self,
        bus: Bus,
        reporter_id: str,
        table: ServiceTable,
        direct: DirectPath,
        metrics: Metrics,
        tasks: TaskGroup,
        *,
        interval_s: float,
    ) -> None:
        self.bus = bus
        self.id = reporter_id
        self.table = table
        self.direct = direct
        self.metrics = metrics
        self._by_service = LabelCache(SERVICE)
        self._cold_starts = metrics.counter("fnplane.cold_starts")
        self._cold_duration = metrics.histogram("fnplane.cold_start.duration")
        self._stage = metrics.histogram("fnplane.cold_start.stage.duration")
        self._queued = metrics.gauge("fnplane.revision.request.queued")
        self._concurrency = metrics.gauge("fnplane.revision.request.concurrency")
        self.tasks = tasks
        self.interval_s = interval_s
        self._last_urgent: dict[str, float] = {}
        self._cold_reported: dict[str, int] = {}  # service → endpoints version reported
        self._reported_nonzero: set[str] = set()

    def urgent(self, name: str) -> None:
        """Requests wait (scale from zero, or a burst beyond the pods): tell `scale` now,
        without waiting for the metrics tick."""
        svc = self.table.get(name)
        now = time.time()
        if svc is None or now - self._last_urgent.get(name, 0.0) < URGENT_MIN_GAP_S:
            return
        self._last_urgent[name] = now
        thr = svc.throttler
        demand = Demand(service=name, reporter=self.id, buffered=thr.buffered + 1,
                        in_flight=thr.in_flight, requests=thr.admitted, ts=now, urgent=True)
        self.tasks.spawn(self._send(demand), name=f"urgent-{name}")

    def cold_start(self, name: str, target: Endpoint, request_in: float,
                   first_byte: float) -> None:
        """Once per endpoint set: the first request a new pod answered."""
        svc = self.table.get(name)
        version = svc.endpoints.version if svc is not None and svc.endpoints else 0
        if self._cold_reported.get(name) == version:
            return
        self._cold_reported[name] = version
        tl = target.timeline
        cs = ColdStart(
            service=name, pod=target.pod, node=target.node, request_in=request_in,
            placement_decided=tl.placed_at, process_spawned=tl.spawned_at, ready=tl.ready_at,
            first_byte_out=first_byte, trace_id=telemetry.current_trace_id(),
            weights_fetched=tl.fetched_at,
        )
        # Counted for the service clients call (a revision's for its service, as the
        # request counters); the record keeps the revision, for `describe`.
        label = svc.spec.revision_of or name if svc is not None else name
        attrs = self._by_service[label]
        self._cold_starts.add(1, attrs)
        self._cold_duration.record(first_byte - request_in, attrs)
        # Each stage apart (the weights' download among them: the control plane's share
        # excludes it); a stage whose timestamps the pod did not report is left out.
        for stage, took in cold_start_stages(cs).items():
            self._stage.record(took, {SERVICE: label, "stage": stage})
        self.tasks.spawn(self.bus.send(ep.COLD_START, cs), name=f"cold-start-{name}")

    async def run(self) -> None:
        """Every interval: each service with activity (and once more after it stops), and
        the heartbeat."""
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.time()
            for svc in self.table:
                name, thr = svc.spec.name, svc.throttler
                in_flight = thr.in_flight + self.direct.total(name)
                busy = thr.buffered + in_flight + thr.admitted > 0
                if not busy and name not in self._reported_nonzero:
                    continue
                demand = Demand(service=name, reporter=self.id, buffered=thr.buffered,
                                in_flight=in_flight, requests=thr.admitted, ts=now)
                thr.admitted = 0
                (self._reported_nonzero.add if busy else self._reported_nonzero.discard)(name)
                attrs = self._by_service[name]
                self._queued.set(thr.buffered, attrs)
                self._concurrency.set(thr.in_flight, attrs)
                await self._send(demand)
            await self._send_heartbeat(now)

    async def _send(self, demand: Demand) -> None:
        try:
            await self.bus.send(ep.DEMAND, demand, shard=shard_of(demand.service))
        except (nats.errors.Error, OSError):
            log.debug("%s: demand report lost", self.id, exc_info=True)

    async def _send_heartbeat(self, now: float) -> None:
        try:
            await self.bus.send(ep.HEARTBEAT, Heartbeat(kind="activator", instance=self.id, ts=now),
                                kind="activator")
        except (nats.errors.Error, OSError):
            log.debug("%s: heartbeat lost", self.id, exc_info=True)
