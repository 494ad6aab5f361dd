"""Nodes come and go. A stack restarted on the same state dir with fewer nodes still serves
cold starts: the node that did not come back is dropped from the partition map (the
first release kept it forever, and every cold start then failed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import aiohttp

from controlplane.stack import Stack
from kernel.identity import login
from tests.stackutil import deploy, sample_spec, stack_config, wait_until

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
