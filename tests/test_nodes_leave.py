"""Nodes come and go. A stack restarted on the same state dir with fewer nodes still serves
cold starts: the node that did not come back is dropped from the partition map (the
first release kept it forever, and every cold start then failed). A node whose agent falls
silent while the stack runs leaves its partition after the heartbeat timeout, its pods are
replaced elsewhere, and it rejoins when its agent is heard again."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import aiohttp

from controlplane.coordinator import Coordinator
from controlplane.stack import Stack
from functions.schedule.instance import ScheduleInstance
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import CoordinatorConfig
from kernel.identity import login
from kernel.messages import (
    Empty,
    NodeInfo,
    Resources,
    RoutingSnapshot,
    ScalingSpec,
    ServiceStatus,
)
from kernel.revisions import parent_of
from kernel.store import Store
from partitions.agents.local import LocalNode
from tests.netcut import Relay
from tests.stackutil import admin, deploy, describe, sample_spec, stack_config, wait_until

REPO = Path(__file__).resolve().parent.parent
BODY = json.loads((REPO / "examples" / "sample" / "request_v2.json").read_text())


async def cold_request(stack: Stack, name: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.url}/v2/models/{name}/infer", json=BODY,
                             timeout=aiohttp.ClientTimeout(total=60)) as r:
            await r.read()
            return r.status


async def test_up_with_three_nodes_then_two_on_the_same_state_dir_serves_cold_starts(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = stack_config(state)
    config = dataclasses.replace(config, coordinator=dataclasses.replace(
        config.coordinator, node_register_timeout_s=2.0))
    three = Stack(dataclasses.replace(config, nodes=dataclasses.replace(config.nodes, count=3)),
                  nats_port=None)
    await three.start()
    try:
        assert three.nats_url is not None
        await deploy(three.nats_url, sample_spec(), login(three.config.credentials, "admin"))
        first = await cold_request(three, "sample")
    finally:
        await three.stop()

    two = Stack(config, nats_port=None)  # config.nodes.count == 2
    await two.start()
    try:
        second = await cold_request(two, "sample")
        assert two.coordinator is not None
        coordinator = two.coordinator

        async def mapped() -> list[str]:
            return sorted(coordinator.pmap.nodes)

        nodes = await wait_until(mapped, lambda ns: len(ns) == 2, timeout=15,
                                 what="node-2 to leave the map")
    finally:
        await two.stop()

    assert (first, second) == (200, 200)
    assert nodes == ["node-0", "node-1"]


async def routed_nodes(nats_url: str, service: str) -> list[str]:
    """The node of every endpoint `route` publishes for `service` (what activators use)."""
    async with admin(nats_url) as bus:
        snap: RoutingSnapshot = await bus.call(ep.ROUTES, Empty(), timeout=5)
    # route publishes per revision (NAME-0000N)
    return sorted(e.node for s in snap.services if parent_of(s.service) == service
                  for e in s.endpoints)


def pod_nodes(status: ServiceStatus) -> list[str]:
    return sorted(p.node for p in status.pods if p.state == "ready")


async def test_a_node_whose_agent_falls_silent_leaves_its_partition_and_its_pods_are_replaced(
    nats_url: str, redis_url: str, tmp_path: Path,
) -> None:
    """node-1's agent reaches NATS through a relay the test pauses: every byte between the
    agent and nats-server stops in both directions while its connection stays open, as when
    the agent's network stalls (a process cannot SIGSTOP part of itself, and closing the
    connection would be a different fault, one nats-py notices at once). Its pod keeps
    running and serving; only the agent is silent. node-1 holds one cpu, so of the service's
    two pods (one cpu each) one lands there and one on node-0."""
    config = stack_config(tmp_path / "state")
    config = dataclasses.replace(
        config,
        nodes=dataclasses.replace(config.nodes, count=1),
        coordinator=dataclasses.replace(config.coordinator, node_heartbeat_timeout_s=3.0),
    )
    relay = Relay(nats_url)
    stack = Stack(config, nats_url=nats_url, redis_url=redis_url)
    node1: LocalNode | None = None
    load_task: asyncio.Task[None] | None = None
    statuses: list[int | str] = []
    stop_load = asyncio.Event()

    async def mapped_nodes() -> list[str]:
        assert stack.coordinator is not None
        return sorted(stack.coordinator.pmap.nodes)

    async def answered() -> int:
        return len(statuses)

    async def load() -> None:
        async with aiohttp.ClientSession() as http:
            while not stop_load.is_set():
                try:
                    async with http.post(f"{stack.url}/v2/models/sample/infer", json=BODY,
                                         timeout=aiohttp.ClientTimeout(total=30)) as r:
                        await r.read()
                        statuses.append(r.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses.append(type(exc).__name__)
                await asyncio.sleep(0.05)

    try:
        await stack.start()
        assert stack.runtime is not None
        node1 = LocalNode(await Bus.connect(await relay.start(), "node-1"),
                          NodeInfo(name="node-1", capacity=Resources(cpu=1, memory_mb=1024)),
                          workdir=config.nodes.workdir, log_dir=tmp_path / "pods")
        await node1.start()
        schedule = stack.runtime.running["schedule"][0]  # type: ignore[attr-defined]
        assert isinstance(schedule, ScheduleInstance)

        async def adopted() -> bool:
            return "node-1" in schedule.view.nodes and "node-1" not in schedule.view.held

        await wait_until(adopted, bool, timeout=10, what="schedule to adopt node-1")
        spec = sample_spec(resources=Resources(cpu=1, memory_mb=128),
                           scaling=ScalingSpec(min_scale=2, stable_window_s=6.0))
        await deploy(nats_url, spec)
        before = await wait_until(lambda: describe(nats_url, "sample"),
                                  lambda s: len(pod_nodes(s)) == 2, timeout=20,
                                  what="two ready pods")
        load_task = asyncio.create_task(load())
        await wait_until(answered, lambda n: n >= 3,
                         timeout=10, what="requests before the silence")

        relay.pause()
        mapped = await wait_until(mapped_nodes,
                                  lambda ns: ns == ["node-0"], timeout=3.0 + 5,
                                  what="node-1 to leave the partition map")
        routed = await wait_until(lambda: routed_nodes(nats_url, "sample"),
                                  lambda ns: "node-1" not in ns, timeout=5,
                                  what="route to drop node-1's pod")
        replaced = await wait_until(lambda: describe(nats_url, "sample"),
                                    lambda s: pod_nodes(s) == ["node-0", "node-0"]
                                    and len(s.pods) == 2, timeout=20,
                                    what="the lost pod replaced on node-0")
        served_while_lost = len(statuses)

        relay.resume()
        back = await wait_until(mapped_nodes,
                                lambda ns: ns == ["node-0", "node-1"], timeout=10,
                                what="node-1 to rejoin the map")
        # Its pod is announced again: `scale` sees one pod too many and stops the one it
        # heard of last, node-1's (an orphan nobody tracks would run forever instead).
        async def node1_pods() -> int:
            assert node1 is not None
            return len(node1.pods)

        await wait_until(node1_pods, lambda n: n == 0, timeout=20,
                         what="scale to stop the surplus pod announced again by node-1")
        after = await describe(nats_url, "sample")
    finally:
        stop_load.set()
        if load_task is not None:
            await load_task
        if node1 is not None:
            await node1.stop()
        await stack.stop()
        await relay.close()

    assert pod_nodes(before) == ["node-0", "node-1"]
    assert mapped == ["node-0"]
    assert routed == ["node-0", "node-0"] or routed == ["node-0"]
    assert replaced.desired_pods == 2
    assert back == ["node-0", "node-1"]
    assert after.desired_pods == 2 and pod_nodes(after) == ["node-0", "node-0"]
    assert served_while_lost >= 3
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]


async def test_a_restarted_coordinator_keeps_the_nodes_whose_agents_still_run(
    nats_url: str, redis_url: str, tmp_path: Path,
) -> None:
    """Only the coordinator restarts (a process runtime, a Deployment's pod): its agents
    never restart, so they never register again on their own. Their heartbeats are answered
    "unknown", they register again, and their nodes stay in the map past the register
    timeout (before heartbeats, every node of a running cluster was dropped here)."""
    config = CoordinatorConfig(node_register_timeout_s=1.5)
    store = Store.from_url(redis_url)
    first = Coordinator(await Bus.connect(nats_url, "coordinator-first"), store, config)
    node = LocalNode(await Bus.connect(nats_url, "node-n0"),
                     NodeInfo(name="n0", capacity=Resources(cpu=1, memory_mb=512)),
                     workdir=tmp_path, log_dir=tmp_path / "pods")
    second: Coordinator | None = None
    present: list[bool] = []
    try:
        await first.start()
        await node.start()

        async def first_map() -> list[str]:
            return sorted(first.pmap.nodes)

        await wait_until(first_map, lambda ns: ns == ["n0"], timeout=5, what="n0 in the map")
        await first.stop()
        second = Coordinator(await Bus.connect(nats_url, "coordinator-second"), store, config)
        await second.start()
        deadline = asyncio.get_running_loop().time() + config.node_register_timeout_s + 1.5
        while asyncio.get_running_loop().time() < deadline:
            present.append("n0" in second.nodes)
            await asyncio.sleep(0.05)
        kept = sorted(second.pmap.nodes)
    finally:
        await node.stop()
        if second is not None:
            await second.stop()
        await first.stop()
        await store.close()

    assert all(present), "n0 left the map while its agent was running"
    assert kept == ["n0"]
