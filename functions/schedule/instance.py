"""The `schedule` control function's NATS adapter. It owns one partition (assigned by the
coordinator, with an epoch), places pods in it, tells the chosen node to start them, and
releases their resources when nodes report them gone."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.msg import Msg

from controlplane import subjects
from controlplane.bus import Bus, RemoteError
from controlplane.config import ScheduleConfig
from controlplane.schemas import (
    Empty,
    Heartbeat,
    Message,
    PartitionMap,
    Placement,
    PlaceRequest,
    PodEvent,
    StartPod,
    Unschedulable,
)
from functions.schedule.core import PartitionView

log = logging.getLogger(__name__)


class ScheduleInstance:
    kind = "schedule"

    def __init__(self, nats_url: str, config: ScheduleConfig, *, instance_id: str = "") -> None:
        self.id = instance_id or f"schedule-{uuid.uuid4().hex[:6]}"
        self.nats_url = nats_url
        self.config = config
        self.view = PartitionView()
        self.bus: Bus | None = None
        self._assigned = asyncio.Event()
        self._map_version = 0
        self._beat_task: asyncio.Task[None] | None = None
        self._placed = 0

    async def start(self) -> None:
        self.bus = bus = await Bus.connect(self.nats_url, self.id)
        await bus.subscribe(subjects.PARTITIONS, self._on_map)
        await bus.subscribe(f"{subjects.POD_EVENTS}.>", self._on_pod_event)
        await bus.subscribe(subjects.PLACE, self._on_place, queue="schedule", concurrent=True)
        self._beat_task = asyncio.create_task(self._heartbeat(), name=f"{self.id}-beat")

    async def stop(self) -> None:
        if self._beat_task is not None:
            self._beat_task.cancel()
            await asyncio.gather(self._beat_task, return_exceptions=True)
            self._beat_task = None
        if self.bus is not None:
            await self.bus.close()

    async def _heartbeat(self) -> None:
        """Announce ourselves until the coordinator gives us a partition, then keep alive."""
        assert self.bus is not None
        while True:
            beat = Heartbeat(
                self.kind,
                self.id,
                time.time(),
                requests_per_s=self._placed / 0.5,
                partition=self.view.partition,
                epoch=self.view.epoch,
            )
            self._placed = 0
            try:
                await self.bus.publish(f"{subjects.HEARTBEAT}.{self.kind}", beat)
                if not self._assigned.is_set():
                    reply = await self.bus.request(subjects.PARTITIONS_GET, Empty(), timeout=0.5)
                    if isinstance(reply, PartitionMap):
                        self._apply_map(reply)
            except RemoteError:
                pass
            except Exception:
                log.debug("%s: heartbeat failed", self.id, exc_info=True)
            await asyncio.sleep(0.25 if not self._assigned.is_set() else 0.5)

    async def _on_map(self, msg: Message, _raw: Msg) -> None:
        if isinstance(msg, PartitionMap):
            self._apply_map(msg)

    def _apply_map(self, pmap: PartitionMap) -> None:
        if pmap.version <= self._map_version:
            return
        self._map_version = pmap.version
        mine = [p for p in pmap.partitions if p.owner == self.id]
        if not mine:
            self.view.assign(-1, 0, [])
            self._assigned.clear()
            return
        part = mine[0]
        infos = [pmap.nodes[n] for n in part.nodes if n in pmap.nodes]
        self.view.assign(part.id, part.epoch, infos)
        self._assigned.set()
        log.info("%s: owns partition %d (epoch %d, %d nodes)", self.id, part.id, part.epoch,
                 len(infos))

    async def _on_pod_event(self, msg: Message, _raw: Msg) -> None:
        if not isinstance(msg, PodEvent):
            return
        if msg.state in ("stopped", "failed"):
            self.view.release(msg.pod)
        elif msg.state == "ready":
            self.view.note_model(msg.node, msg.service)

    async def _on_place(self, msg: Message, _raw: Msg) -> Message:
        assert self.bus is not None
        if not isinstance(msg, PlaceRequest):
            raise RemoteError(400, f"expected PlaceRequest, got {type(msg).__name__}")
        try:
            await asyncio.wait_for(self._assigned.wait(), timeout=2.0)
        except TimeoutError:
            return Unschedulable(msg.pod, msg.service, f"{self.id} owns no partition yet")
        node = self.view.place(msg.pod, msg.resources, msg.model)
        if node is None:
            free = ", ".join(f"{n}: {f.cpu:g} cpu/{f.memory_mb} MiB"
                             for n, f in sorted(self.view.free().items()))
            return Unschedulable(
                msg.pod,
                msg.service,
                f"no node has {msg.resources.cpu:g} cpu and {msg.resources.memory_mb} MiB free"
                f" ({free})",
            )
        decided = time.time()
        self._placed += 1
        spec_reply = await self._start_on_node(msg, node.name, decided)
        if spec_reply is not None:
            self.view.release(msg.pod)
            return Unschedulable(msg.pod, msg.service, spec_reply)
        return Placement(msg.pod, msg.service, node.name, self.view.partition, self.view.epoch,
                         decided)

    async def _start_on_node(self, req: PlaceRequest, node: str, decided: float) -> str | None:
        """Hand the pod to its node; returns an error text when the node refuses."""
        assert self.bus is not None
        try:
            await self.bus.request(
                subjects.node_start(node),
                StartPod(req.pod, req.spec, node, req.requested_at, decided),
                timeout=5.0,
            )
        except RemoteError as exc:
            return f"node {node} refused pod: {exc.message}"
        return None
