"""How many instances each control function should run, from the load its instances report
in heartbeats. Pure, with the time passed in.

Scale up at once when the instances are over their target (queue depth or requests/s per
instance): a burst of placements should not wait. Scale down one instance at a time, and only
after the load has stayed under half of the target for `down_after_s` — the hysteresis that
keeps an instance count from flapping around a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kernel.messages import Heartbeat


@dataclass(frozen=True)
class InstancePolicy:
    min_instances: int = 1
    max_instances: int = 1
    target_rps: float = 500.0  # per instance
    target_queue: float = 32.0  # placements in flight per instance
    down_after_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError("need 1 <= min_instances <= max_instances")


@dataclass
class InstanceScaler:
    policy: InstancePolicy
    _low_since: float | None = None

    def utilization(self, beats: list[Heartbeat], current: int) -> float:
        if current <= 0:
            return 0.0
        rps = sum(b.requests_per_s for b in beats)
        queue = sum(b.queue_depth for b in beats)
        return max(rps / (current * self.policy.target_rps),
                   queue / (current * self.policy.target_queue))

    def desired(self, now: float, beats: list[Heartbeat], current: int) -> int:
        p = self.policy
        if current < p.min_instances:
            return p.min_instances
        util = self.utilization(beats, current)
        if util > 1.0:
            self._low_since = None
            return min(p.max_instances, max(current + 1, math.ceil(current * util)))
        if util < 0.5 and current > p.min_instances:
            if self._low_since is None:
                self._low_since = now
            if now - self._low_since >= p.down_after_s:
                self._low_since = now  # one step, then wait again
                return current - 1
            return current
        self._low_since = None
        return min(max(current, p.min_instances), p.max_instances)


# ---- the interface the coordinator scales instances through (runtime.py, kube_runtime.py) --


class Instance(Protocol):
    id: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


ExitCallback = Callable[[str, str], None]  # (kind, instance id)


class Runtime(Protocol):
    """Starts and stops instances; reports through `on_exit` an instance that died, so the
    coordinator reassigns its partition at once instead of waiting for missed heartbeats."""

    on_exit: ExitCallback | None

    def kinds(self) -> list[str]: ...
    def instances(self, kind: str) -> list[str]: ...
    async def scale(self, kind: str, n: int) -> None: ...
    async def kill(self, kind: str, instance: str) -> None: ...
    async def stop(self) -> None: ...
