"""Admission for one service: a bounded FIFO buffer of waiting requests in front of the
service's pods, each pod a breaker with `container_concurrency` slots (Knative's throttler
and breaker, pkg/activator/net/throttler.go and pkg/queue/breaker.go).

A request takes a slot on the least-loaded pod with room, or waits in the buffer; a full
buffer refuses at once (503 + Retry-After, never unbounded memory: knative/serving#13583);
a wait longer than the request timeout gives up. Slots are handed over in FIFO order as pods
free up or appear. No network here: the request handler owns the I/O.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from activator.workers import ALONE, Worker
from kernel.messages import Endpoint

# How long a pod that did not take a connection is left alone.
SUSPEND_S = 1.0


class BufferFull(Exception):
    pass


class WaitTimeout(Exception):
    pass


class StartFailed(Exception):
    """The service's pods fail to start; waiting longer would only hang the client."""


class ServiceGone(Exception):
    pass


@dataclass(eq=False)
class PodSlot:
    endpoint: Endpoint
    capacity: float
    in_flight: int = 0
    removed: bool = False  # route no longer lists it
    served: int = 0
    # It did not take a connection (refused, reset, timed out): none is sent to it for a
    # moment. Route decides whether it is gone; a healthy pod that was only slow comes back.
    suspended: bool = False

    @property
    def pod(self) -> str:
        return self.endpoint.pod

    @property
    def url(self) -> str:
        return self.endpoint.url

    def has_room(self, elsewhere: int = 0) -> bool:
        """`elsewhere`: requests on this pod that did not pass the throttler (direct path)."""
        return (not self.removed and not self.suspended
                and self.in_flight + elsewhere < self.capacity)


@dataclass(eq=False)
class Waiter:
    future: asyncio.Future[PodSlot]
    since: float
    cold: bool


@dataclass
class ServiceThrottler:
    name: str
    buffer_size: int
    container_concurrency: int = 0
    clock: Callable[[], float] = time.time
    pods: dict[str, PodSlot] = field(default_factory=dict)
    waiters: deque[Waiter] = field(default_factory=deque)
    admitted: int = 0  # requests admitted since the last metrics report
    violations: int = 0  # slots handed out beyond capacity: must stay 0
    # Requests each pod has from the gateway's direct path; both paths share its capacity.
    elsewhere: Callable[[str], int] = lambda _pod: 0
    worker: Worker = ALONE  # this gateway worker's part of each pod

    # ---- what the gateway reports --------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self.waiters)

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self.pods.values())

    def would_wait(self) -> bool:
        """True when a request admitted now would have to wait in the buffer."""
        return self._free_slot() is None

    def ready_pods(self) -> int:
        return sum(1 for p in self.pods.values() if not p.removed)

    def capacity(self) -> float:
        return sum(p.capacity for p in self.pods.values() if not p.removed)

    # ---- admission -----------------------------------------------------------------------

    async def acquire(self, timeout: float) -> tuple[PodSlot, bool]:
        """A slot on a pod, and whether this request had to wait for the service to start."""
        self.admitted += 1
        slot = self._free_slot()
        if slot is not None:
            self._take(slot)
            return slot, False
        if len(self.waiters) >= self.buffer_size:
            self.admitted -= 1
            raise BufferFull(f"buffer of {self.name} is full ({self.buffer_size} waiting)")
        waiter = Waiter(
            asyncio.get_running_loop().create_future(), self.clock(), self.ready_pods() == 0
        )
        self.waiters.append(waiter)
        try:
            # Not wait_for: on 3.11 it swallows a cancellation that lands just after the
            # slot was handed over, and the client that left would be served anyway.
            async with asyncio.timeout(timeout):
                slot = await asyncio.shield(waiter.future)
        except TimeoutError:
            self._abandon(waiter)
            raise WaitTimeout(
                f"no pod of {self.name} became available within {timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        return slot, waiter.cold

    def _abandon(self, waiter: Waiter) -> None:
        """The request left (timeout, client gone): give back a slot handed to it meanwhile."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release(fut.result())
        elif not fut.done():
            fut.cancel()

    def release(self, slot: PodSlot) -> None:
        slot.in_flight -= 1
        slot.served += 1
        if slot.removed and slot.in_flight == 0:
            self.pods.pop(slot.pod, None) if self.pods.get(slot.pod) is slot else None
        self._dispatch()

    def _free_slot(self) -> PodSlot | None:
        best: PodSlot | None = None
        best_load = 0
        for slot in self.pods.values():
            other = self.elsewhere(slot.pod)
            if slot.has_room(other) and (best is None or slot.in_flight + other < best_load):
                best, best_load = slot, slot.in_flight + other
        return best

    def _take(self, slot: PodSlot) -> None:
        slot.in_flight += 1
        if slot.in_flight + self.elsewhere(slot.pod) > slot.capacity:
            self.violations += 1

    def busy(self) -> dict[str, int]:
        return {pod: s.in_flight for pod, s in self.pods.items() if s.in_flight}

    def dispatch(self) -> None:
        """Capacity freed outside the throttler (a direct request ended): serve waiters."""
        self._dispatch()

    def _dispatch(self) -> None:
        while self.waiters:
            slot = self._free_slot()
            if slot is None:
                return
            waiter = self.waiters.popleft()
            if waiter.future.done():
                continue
            self._take(slot)
            waiter.future.set_result(slot)

    # ---- endpoint changes ----------------------------------------------------------------

    def set_endpoints(self, endpoints: list[Endpoint], container_concurrency: int) -> None:
        """Replace the pod set. Pods that left keep their in-flight requests but get no new
        ones; pods that joined take waiting requests at once."""
        self.container_concurrency = container_concurrency
        wanted = {e.pod: e for e in endpoints}
        for pod, slot in list(self.pods.items()):
            if pod not in wanted:
                slot.removed = True
                if slot.in_flight == 0:
                    del self.pods[pod]
        for pod, ep in wanted.items():
            cap = ep.container_concurrency or container_concurrency
            slot = self.pods.get(pod)
            if slot is None:
                self.pods[pod] = PodSlot(ep, self.worker.share(cap, pod) if cap > 0
                                         else math.inf)
            elif slot.removed:
                # Back (marked dead too early, or listed again): the same slot, so requests
                # still in flight on it count against its container concurrency.
                slot.removed = False
        self._dispatch()

    def mark_dead(self, slot: PodSlot, for_s: float = SUSPEND_S) -> None:
        """The pod did not take a connection: send it nothing for a moment, before route
        says whether it is gone. Not for good: a pod that was only slow to accept (an
        overloaded machine) must not stay unused while route, seeing it healthy, never lists
        it again."""
        slot.suspended = True

        def back() -> None:
            slot.suspended = False
            self._dispatch()

        asyncio.get_running_loop().call_later(for_s, back)

    def fail_waiters(self, exc: Exception) -> int:
        failed = 0
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
                failed += 1
        return failed

    def oldest_wait(self) -> float:
        return self.clock() - self.waiters[0].since if self.waiters else 0.0
