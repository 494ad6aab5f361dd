"""Model storage end to end (issue 15): a service with a `storageUri` scales from zero with its
weights fetched into the chosen node's cache and handed to the pod in MODEL_DIR; the cold
start says how long the fetch took; the node reports what its cache holds; a URI the nodes
would refuse is a 400 at deploy, one that cannot be fetched a failed pod naming it; ten pods
of one model starting on one node fetch it once."""

from __future__ import annotations

import asyncio
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import RemoteError
from kernel.messages import (
    ClusterStatus,
    Empty,
    NodeInfo,
    NodeRegistration,
    Resources,
    ServiceSpec,
    StartPod,
)
from partitions.agents.local import LocalNode
from partitions.modelcache.policy import UriPolicy
from partitions.modelcache.store import ModelCache
from tests.stackutil import REPO, admin, deploy, describe, sample_spec, stack_config, wait_until

BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}


def model_dir(root: Path) -> Path:
    m = root / "iris"
    m.mkdir(parents=True)
    shutil.copy(REPO / "examples" / "sample" / "weights.npz", m / "weights.npz")
    (m / "extra.bin").write_bytes(b"\0" * 1_000_000)  # the bulk of "big" weights
    return m


@pytest.mark.timeout(90)
async def test_a_service_scales_from_zero_with_its_weights_from_the_node_cache(
        nats_url: str, redis_url: str, tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_dir(root)
    uri = f"file://{root}/iris"
    cfg = stack_config(tmp_path / "state")
    cfg = replace(cfg, nodes=replace(cfg.nodes, model_root=root, node_cache_bytes=10_000_000))
    stack = Stack(cfg, nats_url=nats_url, redis_url=redis_url)
    await stack.start()
    try:
        for bad, why in ((f"file://{tmp_path}/state/credentials.json", "state dir"),
                         (f"file://{root}/../elsewhere", r"'\.\.'"),
                         (f"file://{root}/missing", "no such file"),
                         ("http://127.0.0.1:9/w.npz", "not on --model-hosts")):
            with pytest.raises(RemoteError, match=why):
                await deploy(nats_url, sample_spec(name="bad", storage_uri=bad))
        await deploy(nats_url, sample_spec(name="iris", storage_uri=uri))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/iris/infer", json=BODY) as r:
                assert r.status == 200, await r.text()
        st = await wait_until(lambda: describe(nats_url, "iris"),
                              lambda s: s.last_cold_start is not None, timeout=10,
                              what="the cold start record")
        cs = st.last_cold_start
        assert cs is not None
        assert cs.placement_decided <= cs.weights_fetched <= cs.process_spawned
        assert "placement_decided->weights_fetched" in cs.stages_ms()

        async def nodes() -> dict[str, NodeInfo]:
            async with admin(nats_url) as bus:
                status: ClusterStatus = await bus.call(ep.ADMIN_STATUS, Empty(), timeout=5)
            return status.partitions.nodes

        seen = await wait_until(nodes, lambda ns: uri in ns[cs.node].models, timeout=10,
                                what="the node's cache report")
        assert seen[cs.node].model_bytes[uri] == (root / "iris" / "weights.npz").stat().st_size \
            + 1_000_000
        assert all(uri not in n.models for name, n in seen.items() if name != cs.node)
    finally:
        await stack.stop()


@pytest.mark.timeout(60)
async def test_prefetch_warms_the_model_on_n_nodes_before_any_request(
        nats_url: str, redis_url: str, tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_dir(root)
    uri = f"file://{root}/iris"
    cfg = stack_config(tmp_path / "state")
    cfg = replace(cfg, nodes=replace(cfg.nodes, model_root=root))
    stack = Stack(cfg, nats_url=nats_url, redis_url=redis_url)
    await stack.start()
    try:
        await deploy(nats_url, sample_spec(name="warm", storage_uri=uri, prefetch=2))

        async def holders() -> list[str]:
            async with admin(nats_url) as bus:
                status: ClusterStatus = await bus.call(ep.ADMIN_STATUS, Empty(), timeout=5)
            return sorted(n.name for n in status.partitions.nodes.values() if uri in n.models)

        await wait_until(holders, lambda h: h == ["node-0", "node-1"], timeout=15,
                         what="the model cached on both nodes")
        assert (await describe(nats_url, "warm")).pods == []  # no pod ran for it
    finally:
        await stack.stop()


@pytest.mark.timeout(60)
async def test_an_unfetchable_uri_is_a_failed_pod_naming_it(
        nats_url: str, redis_url: str, tmp_path: Path) -> None:
    cfg = stack_config(tmp_path / "state")
    # Listed, but nothing listens there: known only when a node tries.
    cfg = replace(cfg, nodes=replace(cfg.nodes, model_hosts=("127.0.0.1:9",)))
    stack = Stack(cfg, nats_url=nats_url, redis_url=redis_url)
    await stack.start()
    try:
        uri = "http://127.0.0.1:9/w.npz"
        await deploy(nats_url, sample_spec(name="nofetch", storage_uri=uri))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/nofetch/infer", json=BODY) as r:
                assert r.status >= 500
        st = await wait_until(lambda: describe(nats_url, "nofetch"),
                              lambda s: uri in s.last_error, timeout=20,
                              what="the failed pod's reason")
        assert "unreachable" in st.last_error
    finally:
        await stack.stop()


@pytest.mark.timeout(60)
async def test_ten_pods_of_one_model_on_one_node_fetch_it_once(
        nats_url: str, tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_dir(root)
    cache = ModelCache(tmp_path / "cache", capacity_bytes=10_000_000,
                       policy=UriPolicy(model_root=root, state_dir=tmp_path / "state"))
    node = LocalNode(await Bus.connect(nats_url, "node-flight"),
                     NodeInfo(name="flight-n0", capacity=Resources(cpu=8, memory_mb=8192)),
                     workdir=tmp_path, log_dir=tmp_path / "pods", cache=cache)
    seen = tmp_path / "seen"
    seen.mkdir()
    # Each pod writes the MODEL_DIR it was given, then waits to be stopped.
    code = ("import os, sys, time; open(os.path.join(sys.argv[1], os.environ['FNPLANE_POD']),"
            " 'w').write(os.environ['MODEL_DIR']); time.sleep(60)")
    spec = ServiceSpec(name="flight", command=[sys.executable, "-c", code, str(seen)],
                       resources=Resources(cpu=0.1, memory_mb=16),
                       storage_uri=f"file://{root}/iris")
    caller = await Bus.connect(nats_url, "test-flight")

    async def registered(_msg: NodeRegistration, _raw: object) -> Empty:
        return Empty()  # as the coordinator answers a node agent's registration

    try:
        await caller.serve(ep.NODE_REGISTER, registered)
        async with node:
            await asyncio.gather(*(
                caller.call(ep.NODE_START, StartPod(pod=f"flight-{i}", spec=spec,
                                                    node="flight-n0", requested_at=0,
                                                    placed_at=0, partition=0, epoch=1),
                            node="flight-n0", timeout=10)
                for i in range(10)))

            async def written() -> int:
                return len(list(seen.iterdir()))

            await wait_until(written, lambda n: n == 10, timeout=30, what="ten pods started")
            dirs = {p.read_text() for p in seen.iterdir()}
            assert cache.fetches == 1
            assert len(dirs) == 1 and Path(dirs.pop()) == tmp_path / "cache" / next(
                iter(cache.entries))
            assert set(cache.users) == {f"flight-{i}" for i in range(10)}
    finally:
        await caller.close()
    assert cache.users == {}  # the pods ended: nothing holds the model any more
