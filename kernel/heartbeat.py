"""Every instance's liveness and load, sent one way: the coordinator declares an instance
dead after `heartbeat_timeout_s` of silence and scales `schedule` on the load fields."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import nats.errors

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.messages import Heartbeat, InstanceKind
from kernel.metricsport import advertised_url

log = logging.getLogger(__name__)

Load = Callable[[float], dict[str, Any]]  # seconds since the last beat → Heartbeat fields


class Heartbeater:
    def __init__(self, bus: Bus, kind: InstanceKind, *, interval_s: float,
                 load: Load | None = None) -> None:
        self.bus = bus
        self.kind = kind
        self.interval_s = interval_s
        self.load = load

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            now = time.monotonic()
            await self.beat(now - last)
            last = now
            await asyncio.sleep(self.interval_s)

    async def beat(self, elapsed_s: float) -> None:
        extra = self.load(max(elapsed_s, 1e-3)) if self.load is not None else {}
        beat = Heartbeat(kind=self.kind, instance=self.bus.name, ts=time.time(),
                         metrics_url=advertised_url(), **extra)
        try:
            await self.bus.send(ep.HEARTBEAT, beat, kind=self.kind)
        except (nats.errors.Error, OSError):
            log.debug("%s: heartbeat lost", self.bus.name, exc_info=True)
