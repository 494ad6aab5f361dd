"""Cache locality end to end (issue 15): with two local nodes of which only one caches a
model, the next scale-from-zero of a service using it lands on the caching node; with the
locality score turned off (`ScheduleConfig.locality`) best fit alone decides, and puts it on
the other. node-1 is made the caching one on purpose: best fit on two idle, equal nodes picks
node-0 by name, so only locality can send the pod to node-1."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.messages import ClusterStatus, Empty, NodeInfo
from tests.stackutil import REPO, admin, deploy, describe, sample_spec, stack_config, wait_until

BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}


def _model(root: Path, name: str, padding: int) -> str:
    m = root / name
    m.mkdir(parents=True)
    shutil.copy(REPO / "examples" / "sample" / "weights.npz", m / "weights.npz")
    (m / "extra.bin").write_bytes(b"\0" * padding)
    return f"file://{m}"


async def _nodes(nats_url: str) -> dict[str, NodeInfo]:
    async with admin(nats_url) as bus:
        status: ClusterStatus = await bus.call(ep.ADMIN_STATUS, Empty(), timeout=5)
    return status.partitions.nodes


async def _holders(nats_url: str, uri: str) -> list[str]:
    return sorted(n.name for n in (await _nodes(nats_url)).values() if uri in n.models)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("locality", [True, False], ids=["locality-on", "locality-off"])
async def test_scale_from_zero_lands_on_the_node_caching_the_model(
        nats_url: str, redis_url: str, tmp_path: Path, locality: bool) -> None:
    root = tmp_path / "models"
    other, wanted = _model(root, "other", 2_000_000), _model(root, "wanted", 100_000)
    cfg = stack_config(tmp_path / "state")
    cfg = replace(cfg, nodes=replace(cfg.nodes, model_root=root),
                  schedule=replace(cfg.schedule, locality=locality))
    stack = Stack(cfg, nats_url=nats_url, redis_url=redis_url)
    await stack.start()
    try:
        # Prefetch goes to the node caching the least: node-0 first, then (node-0 now holding
        # the bigger model) node-1 for the wanted one.
        await deploy(nats_url, sample_spec(name="loc-other", storage_uri=other, prefetch=1))
        await wait_until(lambda: _holders(nats_url, other), lambda h: h == ["node-0"],
                         timeout=15, what="the other model on node-0")
        await deploy(nats_url, sample_spec(name="loc-wanted", storage_uri=wanted, prefetch=1))
        await wait_until(lambda: _holders(nats_url, wanted), lambda h: h == ["node-1"],
                         timeout=15, what="the wanted model on node-1 only")
        assert (await describe(nats_url, "loc-wanted")).pods == []  # still at zero

        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/loc-wanted/infer", json=BODY) as r:
                assert r.status == 200, await r.text()
        st = await wait_until(lambda: describe(nats_url, "loc-wanted"),
                              lambda s: s.last_cold_start is not None, timeout=10,
                              what="the cold start record")
        cs = st.last_cold_start
        assert cs is not None
        if locality:
            assert cs.node == "node-1"  # the node caching the model
            assert await _holders(nats_url, wanted) == ["node-1"]  # nothing fetched anew
        else:
            assert cs.node == "node-0"  # best fit by name: the cache is not consulted
            await wait_until(lambda: _holders(nats_url, wanted),
                             lambda h: h == ["node-0", "node-1"], timeout=10,
                             what="node-0 fetching the model itself")
    finally:
        await stack.stop()
