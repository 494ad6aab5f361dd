"""What every fnplane component is: it is handed a connected bus (one wiring path builds it,
controlplane/build.py), which it then owns; its id is the bus connection's name. `start()`
subscribes and starts its background work in a named task group; `stop()` is idempotent,
ends that work and drains the bus. `async with component:` does both. Its `metrics` are
made on first use (kernel/metrics.py) and shown by its process's metrics port."""

from __future__ import annotations

from functools import cached_property
from typing import Self

from kernel.bus import Bus
from kernel.metrics import Metrics
from kernel.tasks import TaskGroup


class Component:
    kind = ""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.id = bus.name
        self.tasks = TaskGroup(self.id)

    @cached_property
    def metrics(self) -> Metrics:
        return Metrics(self.id, self.kind)

    async def start(self) -> None:
        """Subscribe and start background work; a subclass calls this last or not at all."""

    async def stop(self) -> None:
        """End background work, then drain and close the bus; subclasses do their own
        cleanup first (it may still need the bus) and call this last."""
        await self.tasks.close()
        await self.bus.close()
        if "metrics" in self.__dict__:
            self.metrics.close()

    async def crash(self) -> None:
        """Die as a crashed process would, for fault tests: no unsubscribe, no drain, no
        goodbye — others learn of it only from missed heartbeats. Its series leave the
        process's metrics, as a dead process's would."""
        await self.tasks.close()
        if not self.bus.nc.is_closed:
            await self.bus.nc.close()
        if "metrics" in self.__dict__:
            self.metrics.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
