"""Admission in the activator, as Knative's breaker_test.go states it: a request takes a slot
on the least-loaded pod or waits its turn; a pod never holds more requests than its container
concurrency; every waiter ends exactly once (served, refused, timed out or failed) and no slot
leaks, whatever the order in which pods come and go and clients give up."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activator.throttler import (
    BufferFull,
    PodSlot,
    ServiceThrottler,
    StartFailed,
    WaitTimeout,
)
from kernel.messages import Endpoint

LONG = 30.0  # a wait that must never time out in a test


def ep(pod: str, cc: int = 0) -> Endpoint:
    return Endpoint(
        pod=pod, url=f"http://127.0.0.1:9/{pod}", node="node-1", container_concurrency=cc
    )


def throttler(buffer_size: int = 100, now: list[float] | None = None) -> ServiceThrottler:
    clock = now or [0.0]
    return ServiceThrottler("svc", buffer_size, clock=lambda: clock[0])


async def settle() -> None:
    """Let every task that can run, run (the throttler hands slots over via futures)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def waiting(thr: ServiceThrottler, n: int) -> list[asyncio.Task[tuple[PodSlot, bool]]]:
    tasks = [asyncio.create_task(thr.acquire(LONG)) for _ in range(n)]
    await settle()
    assert thr.buffered == n
    return tasks


# ---- taking a slot -------------------------------------------------------------------------


async def test_a_slot_is_taken_on_the_least_loaded_pod() -> None:
    thr = throttler()
    thr.set_endpoints([ep("a", 2), ep("b", 2)], 0)

    pods = [(await thr.acquire(LONG))[0].pod for _ in range(4)]

    assert pods == ["a", "b", "a", "b"]
    assert (thr.in_flight, thr.buffered, thr.violations) == (4, 0, 0)


async def test_a_request_with_a_free_slot_is_not_cold() -> None:
    thr = throttler()
    thr.set_endpoints([ep("a", 1)], 0)

    slot, cold = await thr.acquire(LONG)

    assert (slot.pod, cold, thr.admitted) == ("a", False, 1)


@pytest.mark.parametrize(
    ("endpoint_cc", "service_cc", "capacity"),
    [(3, 0, 3), (0, 2, 2), (3, 2, 3), (0, 0, float("inf"))],
    ids=["endpoint", "service-default", "endpoint-wins", "unlimited"],
)
def test_capacity_comes_from_the_endpoint_then_the_service(
    endpoint_cc: int, service_cc: int, capacity: float
) -> None:
    thr = throttler()

    thr.set_endpoints([ep("a", endpoint_cc)], service_cc)

    assert thr.pods["a"].capacity == capacity
    assert thr.capacity() == capacity


# ---- waiting -------------------------------------------------------------------------------


async def test_waiters_are_served_in_arrival_order_as_pods_appear_and_free_up() -> None:
    now = [5.0]
    thr = throttler(now=now)
    tasks = await waiting(thr, 3)
    now[0] = 7.0
    assert thr.oldest_wait() == 2.0

    thr.set_endpoints([ep("a", 1)], 0)
    await settle()
    served = [i for i, t in enumerate(tasks) if t.done()]
    assert served == [0]
    for expected in ([0, 1], [0, 1, 2]):
        slot, cold = tasks[served[-1]].result()
        assert cold, "these requests waited for the service to start"
        thr.release(slot)
        await settle()
        served = [i for i, t in enumerate(tasks) if t.done()]
        assert served == expected
    assert (thr.buffered, thr.in_flight, thr.violations) == (0, 1, 0)


async def test_a_full_buffer_refuses_at_once() -> None:
    thr = throttler(buffer_size=2)
    tasks = await waiting(thr, 2)

    with pytest.raises(BufferFull):
        await asyncio.wait_for(thr.acquire(LONG), 0.5)

    assert (thr.buffered, thr.admitted) == (2, 2)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_wait_that_times_out_leaves_the_buffer() -> None:
    thr = throttler()

    with pytest.raises(WaitTimeout):
        await thr.acquire(0.01)

    assert thr.buffered == 0
    thr.set_endpoints([ep("a", 1)], 0)
    assert thr.in_flight == 0, "a slot was handed to a request that had left"


async def test_fail_waiters_raises_in_every_waiter() -> None:
    thr = throttler()
    tasks = await waiting(thr, 3)

    assert thr.fail_waiters(StartFailed("pods of svc fail to start: exit 1")) == 3

    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(r) for r in results] == [StartFailed] * 3
    assert thr.buffered == 0


async def test_a_cancelled_waiter_leaves_the_buffer() -> None:
    thr = throttler()
    [task] = await waiting(thr, 1)

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert thr.buffered == 0


async def test_a_cancelled_waiter_that_was_handed_a_slot_gives_it_back() -> None:
    thr = throttler()
    first, second = await waiting(thr, 2)

    thr.set_endpoints([ep("a", 1)], 0)  # the slot goes to `first`...
    first.cancel()  # ...whose client leaves before it runs again
    await settle()

    assert first.cancelled()
    assert second.done(), "the slot given back went to the next waiter"
    assert (thr.in_flight, thr.buffered, thr.violations) == (1, 0, 0)
    thr.release(second.result()[0])
    assert thr.in_flight == 0


# ---- pods leaving and coming back ----------------------------------------------------------


async def test_a_removed_pod_keeps_its_requests_but_gets_no_new_ones() -> None:
    thr = throttler()
    thr.set_endpoints([ep("a", 2)], 0)
    on_a, _ = await thr.acquire(LONG)

    thr.set_endpoints([ep("b", 2)], 0)

    assert (thr.pods["a"].removed, thr.pods["a"].in_flight) == (True, 1)
    assert [(await thr.acquire(LONG))[0].pod for _ in range(2)] == ["b", "b"]
    assert thr.ready_pods() == 1
    thr.release(on_a)
    assert "a" not in thr.pods, "an idle removed pod is forgotten"


async def test_an_idle_removed_pod_is_forgotten_at_once() -> None:
    thr = throttler()
    thr.set_endpoints([ep("a", 2), ep("b", 2)], 0)

    thr.set_endpoints([ep("b", 2)], 0)

    assert list(thr.pods) == ["b"]


@pytest.mark.parametrize("how", ["removed", "marked-dead"])
async def test_a_pod_listed_again_still_counts_its_requests_in_flight(how: str) -> None:
    thr = throttler()
    thr.set_endpoints([ep("a", 1)], 0)
    slot, _ = await thr.acquire(LONG)
    if how == "removed":
        thr.set_endpoints([], 0)
    else:
        thr.mark_dead(slot)

    thr.set_endpoints([ep("a", 1)], 0)  # route lists it again
    with pytest.raises(WaitTimeout):
        await thr.acquire(0.01)  # its one slot is still taken

    assert thr.violations == 0
    thr.release(slot)
    assert (await thr.acquire(LONG))[0].pod == "a"


async def test_a_pod_marked_dead_comes_back_by_itself_while_route_still_lists_it() -> None:
    """A pod that did not take a connection in time (an overloaded machine) is left alone
    for a moment, not for good: route, seeing it healthy, would never list it again, and a
    one-pod service would answer 503s until its pod was replaced (found by the dataplane
    benchmark under contention)."""
    thr = throttler()
    thr.set_endpoints([ep("a", 1)], 0)
    slot, _ = await thr.acquire(LONG)
    thr.release(slot)
    thr.mark_dead(slot, for_s=0.05)
    with pytest.raises(WaitTimeout):
        await thr.acquire(0.01)  # suspended
    again, _ = await thr.acquire(1.0)  # the waiter is served when the suspension ends
    assert again.pod == "a" and thr.violations == 0


# ---- the invariant, under a random workload ------------------------------------------------

PODS = {"p0": 1, "p1": 2, "p2": 3, "p3": 0}  # container concurrency per pod (0: the service's)
SERVICE_CC = 2


def cap(pod: str) -> int:
    return PODS[pod] or SERVICE_CC


@dataclass
class Client:
    """One request, as the gateway drives it: acquire, hold until told, release in finally."""

    done: asyncio.Event
    task: asyncio.Task[None] | None = None
    slot: PodSlot | None = None
    outcome: str = "waiting"  # waiting | serving | finished | full | failed | cancelled

    async def run(self, thr: ServiceThrottler) -> None:
        try:
            slot, _ = await thr.acquire(LONG)
        except BufferFull:
            self.outcome = "full"
            return
        except StartFailed:
            self.outcome = "failed"
            return
        self.slot, self.outcome = slot, "serving"
        try:
            await self.done.wait()
        finally:
            self.slot = None
            thr.release(slot)
        self.outcome = "finished"


ops = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "arrive", "arrive", "finish", "cancel", "pods", "dead", "fail"]),
        st.integers(0, 15),
    ),
    max_size=60,
)


def check(thr: ServiceThrottler, clients: list[Client]) -> None:
    serving = [c for c in clients if c.slot is not None]
    assert thr.violations == 0
    for pod in PODS:
        on_pod = sum(1 for c in serving if c.slot is not None and c.slot.pod == pod)
        assert on_pod <= cap(pod), f"{on_pod} requests on {pod} (concurrency {cap(pod)})"
    slots = {id(s): s for s in [c.slot for c in serving if c.slot] + list(thr.pods.values())}
    for slot in slots.values():
        holders = sum(1 for c in serving if c.slot is slot)
        assert slot.in_flight == holders, f"{slot.pod}: in_flight {slot.in_flight} != {holders}"
    assert thr.in_flight == len([c for c in serving if c.slot.pod in thr.pods])
    assert thr.buffered == sum(1 for c in clients if c.outcome == "waiting")


async def workload(steps: list[tuple[str, int]], buffer_size: int) -> None:
    thr = throttler(buffer_size)
    clients: list[Client] = []
    for kind, k in steps:
        live = [c for c in clients if c.task is not None and not c.task.done()]
        serving = [c for c in live if c.slot is not None]
        if kind == "arrive":
            c = Client(asyncio.Event())
            c.task = asyncio.create_task(c.run(thr))
            clients.append(c)
        elif kind == "finish" and serving:
            serving[k % len(serving)].done.set()
        elif kind == "cancel" and live:
            victim = live[k % len(live)]
            assert victim.task is not None
            victim.task.cancel()
            await asyncio.gather(victim.task, return_exceptions=True)
            victim.outcome = "cancelled"
        elif kind == "pods":
            listed = [ep(p, cc) for i, (p, cc) in enumerate(PODS.items()) if k >> i & 1]
            thr.set_endpoints(listed, SERVICE_CC)
        elif kind == "dead" and serving:
            slot = serving[k % len(serving)].slot
            assert slot is not None
            thr.mark_dead(slot)
        elif kind == "fail":
            thr.fail_waiters(StartFailed("pods fail to start"))
        await settle()
        check(thr, clients)

    # Drain: every pod back, every request finished; nothing may stay in flight or buffered.
    thr.set_endpoints([ep(p, cc) for p, cc in PODS.items()], SERVICE_CC)
    while any(c.outcome in ("waiting", "serving") for c in clients):
        for c in clients:
            c.done.set()
        await settle()
        check(thr, clients)
    assert (thr.in_flight, thr.buffered, thr.violations) == (0, 0, 0)
    assert all(c.task is not None and c.task.done() for c in clients)


@settings(max_examples=100, deadline=None)
@given(steps=ops, buffer_size=st.integers(1, 8))
def test_container_concurrency_is_never_exceeded_and_no_slot_leaks(
    steps: list[tuple[str, int]], buffer_size: int
) -> None:
    asyncio.run(workload(steps, buffer_size))
