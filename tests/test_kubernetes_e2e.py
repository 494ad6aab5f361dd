"""Scale from zero on Kubernetes, end to end: the whole embedded stack (coordinator, scale,
schedule, route, activator) with the `kubernetes` node backend, against a fake API server on
loopback and a kubelet emulator that runs bound Pods as local processes — no real cluster
can run here. The answers are the sample model's, computed in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np

from controlplane.stack import Stack
from kernel.messages import ScalingSpec
from tests.deployutil import assert_least_privilege
from tests.kubelet import node
from tests.kubeutil import Cluster, fake_cluster
from tests.stackutil import deploy, describe, sample_spec, stack_config, wait_until
from tests.test_scale_from_zero import expected, v2_body

NODES = [node("worker-1.cluster.local", cpu="4", memory="8Gi"),
         node("worker-2.cluster.local", cpu="4", memory="8Gi", models="sample")]


@asynccontextmanager
async def kube_stack(cluster: Cluster, nats_url: str, redis_url: str,
                     state_dir: Path) -> AsyncIterator[Stack]:
    cfg = stack_config(state_dir)
    cfg = replace(cfg, nodes=replace(cfg.nodes, backend="kubernetes"))
    stack = Stack(cfg, nats_url=nats_url, redis_url=redis_url, kubernetes=cluster.config())
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


async def infer(url: str, service: str = "sample") -> tuple[int, str, np.ndarray]:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{url}/v2/models/{service}/infer", json=v2_body()) as r:
        body = await r.json()
        assert r.status == 200, body
        out = body["outputs"][0]
        return r.status, r.headers.get("X-Fnplane-Pod", ""), \
            np.asarray(out["data"]).reshape(out["shape"])


async def test_cold_request_is_answered_through_a_bound_pod(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A service at zero pods: the request waits in the activator, `scale` asks `schedule`,
    the backend creates a Pod with schedulerName fnplane and binds it (to the node that
    caches the model), the kubelet emulator runs it, the Ready condition arrives by watch,
    and the request is answered with the model's output. No real cluster can run here."""
    async with fake_cluster(tmp_path, NODES) as cluster, \
            kube_stack(cluster, nats_url, redis_url, tmp_path / "state") as stack:
        await deploy(nats_url, sample_spec())
        assert (await describe(nats_url, "sample")).ready_pods == 0
        assert cluster.pods() == []

        _, pod_name, out = await asyncio.wait_for(infer(stack.url), timeout=25)
        assert np.allclose(out, expected(), atol=1e-6)

        pods = cluster.pods()
        assert [p["metadata"]["name"] for p in pods] == [pod_name]
        assert pods[0]["spec"]["schedulerName"] == "fnplane"
        assert pods[0]["spec"]["nodeName"] == "worker-2.cluster.local"  # model locality
        st = await wait_until(lambda: describe(nats_url, "sample"),
                              lambda s: s.last_cold_start is not None and s.ready_pods == 1,
                              timeout=5, what="the cold start record")
        cs = st.last_cold_start
        assert cs is not None and cs.node == "worker-2_cluster_local"
        assert cs.request_in <= cs.placement_decided <= cs.process_spawned <= cs.ready
    assert_least_privilege("node", cluster.fake.calls("fnplane-node"))


async def test_restarted_control_plane_adopts_the_running_pod(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The control plane stops (its Pods keep running) and starts again against the same
    Redis and cluster: the backend reports the running Pod, `scale` counts it toward
    min-scale, `schedule` accounts it from the inventory, and the next request is served by
    that same pod; no second Pod is ever created. No real cluster can run here."""
    spec = sample_spec(scaling=ScalingSpec(min_scale=1, stable_window_s=6.0,
                                           scale_to_zero_grace_s=1.0))
    async with fake_cluster(tmp_path, NODES) as cluster:
        async with kube_stack(cluster, nats_url, redis_url, tmp_path / "state") as stack:
            await deploy(nats_url, spec)
            _, first, out = await asyncio.wait_for(infer(stack.url), timeout=25)
            assert np.allclose(out, expected(), atol=1e-6)
        assert [p["metadata"]["name"] for p in cluster.pods()] == [first]

        async with kube_stack(cluster, nats_url, redis_url, tmp_path / "state") as stack:
            st = await wait_until(lambda: describe(nats_url, "sample"),
                                  lambda s: s.ready_pods == 1, timeout=15,
                                  what="the adopted pod counted")
            assert [p.pod for p in st.pods] == [first]
            _, again, out = await asyncio.wait_for(infer(stack.url), timeout=15)
            assert again == first and np.allclose(out, expected(), atol=1e-6)
            # Nothing was started twice: one Pod, one process, ever.
            assert [p["metadata"]["name"] for p in cluster.pods()] == [first]
            assert cluster.kubelet.started == [first]
    assert_least_privilege("node", cluster.fake.calls("fnplane-node"))
