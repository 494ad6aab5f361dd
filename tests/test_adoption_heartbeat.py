"""Adoption never silences a partition owner. A `schedule` instance that is given a node asks
it what it runs, holding its assignment lock, for up to `ADOPT_TIMEOUT_S` (2 s) — twice the
coordinator's heartbeat timeout — and then keeps asking every beat while the node stays
silent. Its heartbeat runs as a task of its own that takes no lock, so the coordinator must
never take it for dead meanwhile. Real nats-server, Redis, coordinator and instance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.msg import Msg

from controlplane import build
from controlplane.coordinator import Coordinator
from controlplane.runtime import TaskRuntime
from functions.schedule.instance import ADOPT_TIMEOUT_S, ScheduleInstance
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import Config, CoordinatorConfig
from kernel.messages import NodeInfo, Resources
from kernel.store import Store
from partitions.agents.contract import NodeHeartbeater, register


async def test_a_node_that_never_says_what_it_runs_does_not_delay_its_owners_heartbeat(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The node `mute` is registered and vouched for by its agent (this test's connection,
    which heartbeats for it but serves no inventory): an agent alive on the bus whose
    answers never come, the slowest a node can be."""
    config = CoordinatorConfig(schedule_min=1, schedule_max=1)
    assert ADOPT_TIMEOUT_S > config.heartbeat_timeout_s  # else this would prove nothing
    store = Store.from_url(redis_url)
    runtime = TaskRuntime({"schedule": lambda: build.schedule(Config(nats_url=nats_url))})
    coord = Coordinator(await Bus.connect(nats_url, "coordinator-adopt"), store, config,
                        runtime=runtime)
    agent = await Bus.connect(nats_url, "node-mute")
    watcher = await Bus.connect(nats_url, "test-watcher")
    beats_locked: list[bool] = []  # one per heartbeat: was adoption holding the lock then?
    owners_seen: set[str] = set()
    heartbeats: asyncio.Task[None] | None = None

    def instance() -> ScheduleInstance | None:
        running = runtime.running["schedule"]
        return running[0] if running else None  # type: ignore[return-value]

    async def on_beat(raw: Msg) -> None:
        if (inst := instance()) is not None:
            beats_locked.append(inst._assign_lock.locked())

    await watcher.nc.subscribe(ep.HEARTBEAT.subject_for(kind="schedule"), cb=on_beat)
    try:
        await coord.start()
        await register(agent, [NodeInfo(name="mute", capacity=Resources(cpu=4, memory_mb=4096))])
        heartbeats = asyncio.create_task(
            NodeHeartbeater(agent, nodes=lambda: ["mute"], rejoin=register_again(agent)).run())
        # Through the first adoption (2 s) and a few of the retries after it.
        deadline = time.monotonic() + ADOPT_TIMEOUT_S + 2.0
        held_seen = False
        while time.monotonic() < deadline:
            owners_seen.update(runtime.instances("schedule"))
            inst = instance()
            held_seen = held_seen or (inst is not None and "mute" in inst.view.held)
            await asyncio.sleep(0.05)
        final = instance()
        still_held = final is not None and "mute" in final.view.held
        partition = [p for p in coord.pmap.partitions if "mute" in p.nodes]
    finally:
        if heartbeats is not None:
            heartbeats.cancel()
            await asyncio.gather(heartbeats, return_exceptions=True)
        await coord.stop()
        await store.close()
        await agent.close()
        await watcher.close()

    assert held_seen and still_held, "the mute node was never held: nothing was adopted"
    assert len(owners_seen) == 1, f"the owner was declared dead and replaced: {owners_seen}"
    assert [p.owner for p in partition] == sorted(owners_seen)
    assert sum(beats_locked) >= 2, f"no heartbeat while adopting: {beats_locked}"


def register_again(bus: Bus) -> Callable[[list[str]], Awaitable[None]]:
    """What the mute node's agent does when the coordinator no longer knows it."""

    async def rejoin(names: list[str]) -> None:
        await register(bus, [NodeInfo(name=n, capacity=Resources(cpu=4, memory_mb=4096))
                             for n in names])

    return rejoin
