"""The activator's direct path: when `route` says a service has spare capacity (direct mode),
requests go straight to a pod and the activator's buffer and throttler leave the path, as
Knative's ingress bypasses its activator (and unlike KEDA's interceptor, which stays in the
path of all warm traffic, kedacore/http-add-on#1752).

Direct sends still honour container concurrency: a pod with no free slot is skipped, and
when every pod is full the request takes the activator path instead, so a burst that
outruns the mode switch is buffered, not dropped and not piled on a pod.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from activator.workers import ALONE, Worker
from kernel.messages import Endpoint


@dataclass
class DirectPath:
    in_flight: dict[str, dict[str, int]] = field(default_factory=dict)  # service → pod → n
    worker: Worker = ALONE  # this gateway worker's part of each pod
    _rr: itertools.count = field(default_factory=itertools.count)
    sent: int = 0

    def try_acquire(
        self,
        service: str,
        endpoints: list[Endpoint],
        container_concurrency: int,
        busy: dict[str, int] | None = None,
    ) -> Endpoint | None:
        """A pod with room, round-robin from a rotating start; None when all are full.
        `busy` adds requests the activator has on each pod, so the two paths together never
        exceed a pod's container concurrency."""
        if not endpoints:
            return None
        counts = self.in_flight.setdefault(service, {})
        start = next(self._rr) % len(endpoints)
        for i in range(len(endpoints)):
            ep = endpoints[(start + i) % len(endpoints)]
            limit = ep.container_concurrency or container_concurrency
            cap = self.worker.share(limit, ep.pod)
            if limit > 0 and cap == 0:
                continue  # its whole capacity belongs to other gateway workers
            used = counts.get(ep.pod, 0) + (busy or {}).get(ep.pod, 0)
            if cap <= 0 or used < cap:
                counts[ep.pod] = counts.get(ep.pod, 0) + 1
                self.sent += 1
                return ep
        return None

    def release(self, service: str, pod: str) -> None:
        counts = self.in_flight.get(service, {})
        n = counts.get(pod, 0) - 1
        if n > 0:
            counts[pod] = n
        else:
            counts.pop(pod, None)

    def total(self, service: str) -> int:
        return sum(self.in_flight.get(service, {}).values())

    def on_pod(self, service: str, pod: str) -> int:
        return self.in_flight.get(service, {}).get(pod, 0)
