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
from kernel.shards import shard_of
from kernel.tasks import TaskGroup

log = logging.getLogger(__name__)

URGENT_MIN_GAP_S = 0.05


class DemandReporter:
    def __init__(
        self,
        bus: Bus,
        reporter_id: str,
        table: ServiceTable,
        direct: DirectPath,
        metrics: telemetry.Registry,
        tasks: TaskGroup,
        *,
        interval_s: float,
    ) -> None:
        self.bus = bus
        self.id = reporter_id
        self.table = table
        self.direct = direct
        self.metrics = metrics
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
        self.metrics.observe("fnplane.cold_start.duration", first_byte - request_in, service=name)
        # The stage the weights' download took, apart: the control plane's share excludes it.
        fetch = tl.fetched_at - tl.placed_at if tl.fetched_at and tl.placed_at else 0.0
        self.metrics.observe("fnplane.cold_start.weights_fetch.duration", fetch, service=name)
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
                self.metrics.set("fnplane.revision.request.queued", thr.buffered, service=name)
                self.metrics.set("fnplane.revision.request.in_flight", thr.in_flight,
                                 service=name)
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
