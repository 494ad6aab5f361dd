"""The readiness probe of a pod once it is ready, as a kubelet runs it: probed every period,
`unready` after `failure_threshold` failures in a row, `ready` again at the first success
(Kubernetes' successThreshold is 1 by default). Pure: the node agent probes, feeds each
outcome in and emits the state this returns; the start-up probe (fast, until the first
success) stays the agent's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Readiness = Literal["ready", "unready"]


@dataclass
class ReadinessProbe:
    failure_threshold: int = 3
    state: Readiness = "ready"  # it starts after the pod's first success
    failures: int = 0  # in a row

    def observe(self, ok: bool) -> Readiness | None:
        """One probe's outcome; the new state when it changed, else None."""
        if ok:
            self.failures = 0
            if self.state == "unready":
                self.state = "ready"
                return "ready"
            return None
        self.failures += 1
        if self.state == "ready" and self.failures >= self.failure_threshold:
            self.state = "unready"
            return "unready"
        return None
