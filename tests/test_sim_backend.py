"""The `sim` node backend keeps the node contract of the `local` one (registration, start/stop
request-reply, pod events, inventory, epoch fencing) for many nodes at once, and keeps the
ground truth the scheduler benchmark relies on: what runs where, and which node is
over-committed. Against the session's real nats-server; no coordinator needed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    Empty,
    Inventory,
    InventoryRequest,
    NodeFree,
    NodeInfo,
    NodeRegistration,
    Partition,
    PartitionMap,
    PodEvent,
    Resources,
    ServiceSpec,
    StartPod,
    StopPod,
)
from partitions.agents.sim import SimCluster

NODE = Resources(cpu=4.0, memory_mb=8192, gpu=0)


def nodes(n: int, cap: Resources = NODE) -> list[NodeInfo]:
    return [
        NodeInfo(name=f"simt-{i}", capacity=cap, models=["warm-model"], backend="sim")
        for i in range(n)
    ]


def spec(name: str, cpu: float = 1.0, memory_mb: int = 1024) -> ServiceSpec:
    return ServiceSpec(
        name=name, command=["sim"], resources=Resources(cpu=cpu, memory_mb=memory_mb)
    )


def start(pod: str, node: str, s: ServiceSpec, *, partition: int = -1, epoch: int = 0) -> StartPod:
    now = time.time()
    return StartPod(
        pod=pod,
        spec=s,
        node=node,
        requested_at=now,
        placed_at=now,
        partition=partition,
        epoch=epoch,
    )


class Registrar:
    """Stands in for the coordinator: answers registrations and remembers them."""

    def __init__(self) -> None:
        self.registrations: list[NodeRegistration] = []

    async def on_register(self, msg: NodeRegistration, _raw: object) -> Empty:
        self.registrations.append(msg)
        return Empty()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[tuple[Bus, Registrar]]:
    bus = await Bus.connect(nats_url, "test-sim-client")
    registrar = Registrar()
    await bus.serve(ep.NODE_REGISTER, registrar.on_register)
    yield bus, registrar
    await bus.close()


async def running(nats_url: str, infos: list[NodeInfo], **kw: object) -> SimCluster:
    """A sim as the scheduler benchmark runs it: it also takes the baselines' starts, which
    name no partition."""
    kw.setdefault("unpartitioned", True)
    bus = await Bus.connect(nats_url, str(kw.pop("name", "sim")))
    sim = SimCluster(bus, infos, **kw)  # type: ignore[arg-type]
    await sim.start()
    return sim


async def test_registers_every_node_in_one_message(
    nats_url: str, client: tuple[Bus, Registrar]
) -> None:
    _, registrar = client
    sim = await running(nats_url, nodes(300))
    try:
        assert len(registrar.registrations) == 1
        assert len(registrar.registrations[0].infos) == 300
    finally:
        await sim.stop()


async def test_pod_starts_after_the_delay_and_stops_with_events(
    nats_url: str, client: tuple[Bus, Registrar]
) -> None:
    bus, _ = client
    events: list[tuple[float, PodEvent]] = []

    async def on_event(msg: PodEvent, _raw: object) -> None:
        events.append((time.monotonic(), msg))

    await bus.serve(ep.POD_EVENTS, on_event, service="sim-events")
    sim = await running(nats_url, nodes(3), start_delay_s=0.3)
    try:
        t0 = time.monotonic()
        s = spec("sim-events")
        assert await bus.call(ep.NODE_START, start("p1", "simt-1", s), node="simt-1") == Empty()
        # A retried start is idempotent: still one pod.
        assert await bus.call(ep.NODE_START, start("p1", "simt-1", s), node="simt-1") == Empty()
        await wait_for(lambda: len(events) >= 2, 3.0)
        (t_start, starting), (t_ready, ready) = events[:2]
        assert [starting.state, ready.state] == ["starting", "ready"]
        assert t_start - t0 < 0.25, "starting is announced at once"
        assert t_ready - t0 >= 0.29, "ready comes after the simulated start delay"
        assert ready.url == "sim://simt-1/p1" and ready.node == "simt-1"
        assert ready.timeline.ready_at >= ready.timeline.spawned_at > 0
        assert sim.usage("simt-1") == Resources(cpu=1.0, memory_mb=1024)

        await bus.call(ep.NODE_STOP, StopPod(pod="p1", service="sim-events"), node="simt-1")
        await wait_for(lambda: len(events) >= 4, 3.0)
        assert [e.state for _, e in events[2:4]] == ["terminating", "stopped"]
        assert sim.usage("simt-1") == Resources()
        assert sim.started_pods() == {}
    finally:
        await sim.stop()


async def test_many_pods_become_ready_from_one_timer(
    nats_url: str, client: tuple[Bus, Registrar]
) -> None:
    bus, _ = client
    ready: set[str] = set()

    async def on_event(msg: PodEvent, _raw: object) -> None:
        if msg.state == "ready":
            ready.add(msg.pod)

    await bus.serve(ep.POD_EVENTS, on_event, service="sim-many")
    sim = await running(nats_url, nodes(50), start_delay_s=0.1)
    try:
        s = spec("sim-many", cpu=0.1, memory_mb=64)
        await asyncio.gather(
            *(
                bus.call(
                    ep.NODE_START, start(f"m{i}", f"simt-{i % 50}", s), node=f"simt-{i % 50}"
                )
                for i in range(500)
            )
        )
        await wait_for(lambda: len(ready) == 500, 5.0)
        assert sim.stats.started == 500
    finally:
        await sim.stop()


async def test_fence_refuses_a_stale_epoch(nats_url: str, client: tuple[Bus, Registrar]) -> None:
    bus, _ = client
    sim = await running(nats_url, nodes(4))
    try:
        infos = {n.name: n for n in nodes(4)}
        pmap = PartitionMap(
            version=10**9,
            partitions=[
                Partition(id=0, epoch=3, owner="owner-a", nodes=["simt-0", "simt-1"]),
                Partition(id=1, epoch=1, owner="owner-b", nodes=["simt-2", "simt-3"]),
            ],
            nodes=infos,
        )
        await bus.send(ep.PARTITION_MAP, pmap)
        await wait_for(lambda: sim.fence.version == pmap.version, 2.0)
        s = spec("sim-fence")
        with pytest.raises(RemoteError) as stale:
            await bus.call(
                ep.NODE_START, start("f1", "simt-0", s, partition=0, epoch=2), node="simt-0"
            )
        assert (
            stale.value.code == ErrorCode.STALE_EPOCH and "stale epoch" in stale.value.message
        )
        with pytest.raises(RemoteError) as wrong:
            await bus.call(
                ep.NODE_START, start("f2", "simt-0", s, partition=1, epoch=1), node="simt-0"
            )
        assert wrong.value.code == ErrorCode.STALE_EPOCH
        await bus.call(
            ep.NODE_START, start("f3", "simt-0", s, partition=0, epoch=3), node="simt-0"
        )
        # An unpartitioned caller (a baseline scheduler) is not fenced.
        await bus.call(ep.NODE_START, start("f4", "simt-2", s), node="simt-2")
        assert set(sim.started_pods()) == {"f3", "f4"}
        assert sim.stats.refused_fence == 2
    finally:
        await sim.stop()


async def test_outside_the_benchmark_a_start_must_name_a_partition(
    nats_url: str, client: tuple[Bus, Registrar]
) -> None:
    """The partition −1 bypass is the benchmark's alone: a node agent not configured for
    it refuses such a start as invalid (a forged one ran `sh -c id` before)."""
    bus, _ = client
    sim = await running(nats_url, nodes(2), name="sim-strict", unpartitioned=False)
    try:
        with pytest.raises(RemoteError) as refused:
            await bus.call(ep.NODE_START, start("u1", "simt-0", spec("sim-strict")),
                           node="simt-0")
        await bus.call(ep.NODE_START, start("u2", "simt-0", spec("sim-strict"), partition=0,
                                            epoch=1), node="simt-0")
    finally:
        await sim.stop()

    assert refused.value.code is ErrorCode.INVALID and "names no partition" in refused.value.message
    assert set(sim.started_pods()) == {"u2"}


async def test_inventory_covers_prefilled_pods_in_one_answer(
    nats_url: str, client: tuple[Bus, Registrar]
) -> None:
    bus, _ = client
    sim = await running(nats_url, nodes(5), prefill=0.5, prefill_pods_per_node=2)
    try:
        answers = await bus.gather(
            ep.NODE_INVENTORY,
            InventoryRequest(nodes=["simt-0", "simt-3", "elsewhere"]),
            timeout=0.5,
        )
        assert len(answers) == 1
        inv = answers[0]
        assert isinstance(inv, Inventory) and set(inv.pods) == {"simt-0", "simt-3"}
        for pods in inv.pods.values():
            assert len(pods) == 2
            total = pods[0].resources + pods[1].resources
            assert total == Resources(cpu=2.0, memory_mb=4096, gpu=0)
        assert sim.overcommitted_nodes() == []
    finally:
        await sim.stop()


async def test_large_inventory_is_split_but_complete(
    nats_url: str, client: tuple[Bus, Registrar]
) -> None:
    bus, _ = client
    many = nodes(1500)
    sim = await running(nats_url, many, prefill=0.8, prefill_pods_per_node=3)
    try:
        answers = await bus.gather(
            ep.NODE_INVENTORY, InventoryRequest(nodes=[n.name for n in many]), timeout=1.0
        )
        assert len(answers) > 1
        covered: dict[str, int] = {}
        for a in answers:
            assert isinstance(a, Inventory)
            covered.update({n: len(p) for n, p in a.pods.items()})
        assert covered == {n.name: 3 for n in many}
    finally:
        await sim.stop()


async def test_overcommit_is_counted_and_admission_check_refuses(
    nats_url: str, client: tuple[Bus, Registrar]
) -> None:
    bus, _ = client
    sim = await running(nats_url, nodes(2), prefill=0.75)  # 1 cpu, 2048 MiB free per node
    try:
        probe = await bus.call(ep.NODE_PROBE, Empty(), node="simt-0")
        assert isinstance(probe, NodeFree) and probe.free == Resources(cpu=1.0, memory_mb=2048)
        assert probe.models == ["warm-model"]

        big = spec("sim-big", cpu=2.0, memory_mb=1024)
        # The sampling baseline asks the node to check: refused, nothing over-committed.
        with pytest.raises(RemoteError) as refused:
            await bus.call(
                ep.NODE_START,
                start("b1", "simt-0", big),
                headers={ep.ADMIT_IF_FITS: "1"},
                node="simt-0",
            )
        assert refused.value.code == ErrorCode.NO_CAPACITY
        assert sim.overcommitted_nodes() == [] and sim.stats.refused_fit == 1
        # Anyone else is trusted, and an over-commit is seen, not hidden.
        await bus.call(ep.NODE_START, start("b2", "simt-0", big), node="simt-0")
        assert sim.overcommitted_nodes() == ["simt-0"]
        await bus.call(ep.NODE_STOP, StopPod(pod="b2", service="sim-big"), node="simt-0")
        assert sim.overcommitted_nodes() == []
        # The same pod on a second node would be a double placement: refused and counted.
        small = spec("sim-small", cpu=0.5, memory_mb=256)
        await bus.call(ep.NODE_START, start("d1", "simt-0", small), node="simt-0")
        with pytest.raises(RemoteError):
            await bus.call(ep.NODE_START, start("d1", "simt-1", small), node="simt-1")
        assert sim.stats.duplicate_starts == 1 and sim.started_pods() == {"d1": "simt-0"}
    finally:
        await sim.stop()


async def wait_for(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
