"""Gateway workers (`fnplane up --gateway-workers N`) share one port and every pod. As Knative
divides a revision's capacity among its activators, each worker may send a pod only its part
of the pod's container concurrency: equal parts, the remainder spread over the workers by pod,
so the parts of all workers add up to the pod's limit exactly and no pod is ever sent more
than it takes, whichever workers the clients reach. Pure."""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Worker:
    index: int = 0
    count: int = 1

    def share(self, capacity: int, pod: str) -> int:
        """This worker's part of a pod's capacity (<= 0: unlimited, and stays so). A part
        can be 0 (capacity below the worker count): that worker leaves the pod to others."""
        if self.count <= 1 or capacity <= 0:
            return capacity
        base, extra = divmod(capacity, self.count)
        first = zlib.crc32(pod.encode()) % self.count  # who gets the first extra slot
        return base + (1 if (self.index - first) % self.count < extra else 0)

    def buffer(self, size: int) -> int:
        """This worker's part of a service's buffer: the README's bound holds in sum."""
        return max(1, size // self.count)


ALONE = Worker()
