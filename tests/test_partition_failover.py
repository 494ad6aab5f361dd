"""Partition ownership under failure, over a real nats-server and Redis: the coordinator, its
instance runtime, real `schedule` instances and real local node agents. Pods here are
`sleep` processes: these tests are about placements and ownership, not serving."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from controlplane import build
from controlplane.coordinator import Coordinator
from controlplane.elastic import Runtime
from controlplane.runtime import ProcessRuntime, TaskRuntime
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import Config, CoordinatorConfig
from kernel.errors import ErrorCode, NoResponders, RemoteError, RequestTimeout
from kernel.messages import (
    NodeInfo,
    Placement,
    PlaceRequest,
    ReserveRequest,
    Resources,
    ScalingSpec,
    ServiceSpec,
    StartPod,
)
from kernel.store import Store
from partitions.agents.local import LocalNode

SLEEPER = ServiceSpec(name="sleeper", command=["sleep", "30"],
                      resources=Resources(cpu=0.1, memory_mb=16), scaling=ScalingSpec(),
                      startup_timeout_s=60)


@asynccontextmanager
async def cluster(
    nats_url: str, redis_url: str, tmp_path: Path, runtime: Runtime, nodes: int = 4
) -> AsyncIterator[Coordinator]:
    store = Store.from_url(redis_url)
    config = CoordinatorConfig(schedule_min=2, schedule_max=2)
    coord = Coordinator(await Bus.connect(nats_url, "coordinator-test"), store, config,
                        runtime=runtime)
    agents = [
        LocalNode(await Bus.connect(nats_url, f"node-n{i}"),
                  NodeInfo(name=f"n{i}", capacity=Resources(cpu=2, memory_mb=2048)),
                  workdir=tmp_path, log_dir=tmp_path / "pods")
        for i in range(nodes)
    ]
    await coord.start()
    await asyncio.gather(*(a.start() for a in agents))
    try:
        await until(lambda: owned(coord) == 2 and all_nodes_assigned(coord, nodes), 10,
                    "two owned partitions covering every node")
        yield coord
    finally:
        await asyncio.gather(*(a.stop() for a in agents))
        await coord.stop()
        await store.close()


def owned(coord: Coordinator) -> int:
    return sum(1 for p in coord.pmap.partitions if p.owner)


def all_nodes_assigned(coord: Coordinator, n: int) -> bool:
    return sum(len(p.nodes) for p in coord.pmap.partitions if p.owner) == n


async def until(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def place_some(nats_url: str, n: int) -> list[Placement]:
    bus = await Bus.connect(nats_url, "test-placer")
    try:
        out = []
        for _ in range(n):
            req = PlaceRequest(pod=f"sleeper-{uuid.uuid4().hex[:6]}", spec=SLEEPER,
                               requested_at=time.time())
            reply = await bus.call(ep.PLACE, req, timeout=5)
            assert isinstance(reply, Placement), reply
            out.append(reply)
        return out
    finally:
        await bus.close()


def schedule_runtime(nats_url: str) -> TaskRuntime:
    return TaskRuntime({"schedule": lambda: build.schedule(Config(nats_url=nats_url))})


async def test_crashed_instance_partition_reassigned_within_2s(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The instance dies silently (no runtime exit notice): only missed heartbeats tell."""
    runtime = schedule_runtime(nats_url)
    async with cluster(nats_url, redis_url, tmp_path, runtime) as coord:
        assert len(await place_some(nats_url, 4)) == 4
        victim = runtime.running["schedule"][0]
        runtime.running["schedule"].remove(victim)  # the runtime does not see it go
        await victim.crash()
        elapsed = await until(
            lambda: all(p.owner != victim.id for p in coord.pmap.partitions)
            and all_nodes_assigned(coord, 4),
            5, "the victim's nodes reassigned to a live owner",
        )
        assert elapsed < 2.0, f"reassigned after {elapsed:.2f}s"
        placements = await place_some(nats_url, 6)
        assert {p.node for p in placements} <= {f"n{i}" for i in range(4)}


async def test_sigkilled_instance_process_partition_reassigned_within_2s(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    runtime = ProcessRuntime(Config(nats_url=nats_url, redis_url=redis_url), kinds=["schedule"])
    async with cluster(nats_url, redis_url, tmp_path, runtime) as coord:
        victim = runtime.instances("schedule")[0]
        old_epochs = {p.id: p.epoch for p in coord.pmap.partitions if p.owner == victim}
        await runtime.kill("schedule", victim)
        elapsed = await until(
            lambda: all(p.owner != victim for p in coord.pmap.partitions)
            and all_nodes_assigned(coord, 4),
            5, "the killed process's nodes reassigned",
        )
        assert elapsed < 2.0, f"reassigned after {elapsed:.2f}s"
        for p in coord.pmap.partitions:
            if p.id in old_epochs:
                assert p.epoch > old_epochs[p.id], "a reassigned partition has a new epoch"
        # The runtime replaces the instance (min 2) and placements go on throughout.
        assert len(await place_some(nats_url, 6)) == 6
        await until(lambda: owned(coord) == 2, 10, "a replacement instance owning a partition")


async def test_stale_owner_commit_is_refused_by_the_node(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    runtime = schedule_runtime(nats_url)
    async with cluster(nats_url, redis_url, tmp_path, runtime) as coord:
        part = next(p for p in coord.pmap.partitions if p.owner)
        node = part.nodes[0]
        old_epoch = part.epoch
        victim = next(i for i in runtime.running["schedule"] if i.id == part.owner)
        await runtime.kill("schedule", victim.id)
        await until(lambda: all(p.owner != victim.id for p in coord.pmap.partitions), 5,
                    "reassignment")
        bus = await Bus.connect(nats_url, "stale-owner")
        try:
            start = StartPod(pod="sleeper-stale", spec=SLEEPER, node=node,
                             requested_at=time.time(), placed_at=time.time(),
                             partition=part.id, epoch=old_epoch)
            with pytest.raises(RemoteError) as err:
                await bus.call(ep.NODE_START, start, timeout=5, node=node)
            # Refused either way the map moved on: a newer epoch for the partition, or the
            # node now belonging to another partition.
            assert err.value.code == ErrorCode.STALE_EPOCH
            assert "stale epoch" in err.value.message or "not 0" in err.value.message
        finally:
            await bus.close()


async def place_like_scale(bus: Bus, spec: ServiceSpec, wait_s: float = 15) -> Placement:
    """As `scale` places: nobody in the queue group for a moment (a partition changing
    hands) is waited out, and a pod not placed — unschedulable, or its request handed to
    an instance as it died (the server learns of a dead connection a moment after it
    closes) — is placed again shortly; its requests wait in the activators meanwhile."""
    deadline = time.monotonic() + wait_s
    req = PlaceRequest(pod=f"{spec.name}-{uuid.uuid4().hex[:6]}", spec=spec,
                       requested_at=time.time())
    while True:
        try:
            reply = await bus.call(ep.PLACE, req, timeout=2)
        except (NoResponders, RequestTimeout):
            reply = None
        if isinstance(reply, Placement):
            return reply
        assert time.monotonic() < deadline, f"not placed within {wait_s}s: {reply}"
        await asyncio.sleep(0.2)


async def test_the_only_serving_instance_dies_while_its_peer_is_aside(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """One instance's partition is full, so it stepped aside for its peer: the peer is then
    the whole placement queue group. It dies silently; placements must go on (the aside
    instance takes the dead one's nodes, or a replacement does), none lost, none hung."""
    runtime = schedule_runtime(nats_url)
    big = msgspec.structs.replace(SLEEPER, name="big",
                                  resources=Resources(cpu=2, memory_mb=16))
    async with cluster(nats_url, redis_url, tmp_path, runtime) as coord:
        full, other = runtime.running["schedule"][:2]
        part = next(p for p in coord.pmap.partitions if p.owner == full.id)
        bus = await Bus.connect(nats_url, "test-aside")
        try:
            for node in part.nodes:  # fill every node of `full`'s partition, through it
                place = PlaceRequest(pod=f"big-{node}", spec=big, requested_at=time.time())
                reply = await bus.call(ep.RESERVE, ReserveRequest(place=place, asker="test"),
                                       timeout=5, partition=part.id)
                assert isinstance(reply, Placement), reply
            await until(lambda: full.view.summary(full.id).largest_free.cpu < 0.1, 5,
                        "the full partition's owner seeing it full")
            for _ in range(30):  # the queue group hands some of these to `full`
                await place_like_scale(bus, SLEEPER)
                if not full.membership.serving:
                    break
            assert not full.membership.serving, "never stepped aside"

            runtime.running["schedule"].remove(other)  # dies unseen by the runtime
            await other.crash()
            placed = await asyncio.gather(*(place_like_scale(bus, SLEEPER)
                                            for _ in range(6)))
            assert len(placed) == 6
            await until(lambda: all(p.owner != other.id for p in coord.pmap.partitions), 5,
                        "the dead instance's partition reassigned")
        finally:
            await bus.close()
