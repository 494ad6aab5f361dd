"""GPU pods end to end. On Kubernetes, GPU node pools are tainted (GKE: `nvidia.com/gpu=present:
NoSchedule`): a GPU pod goes there, a pod without the toleration does not — against a fake
API server and a kubelet emulator, as no real cluster can run here. On the local backend, two
GPU pods on one node are given different GPUs through CUDA_VISIBLE_DEVICES, read by the pods
themselves (real processes)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from controlplane.stack import Stack
from kernel.messages import Resources, ScalingSpec
from tests.kubelet import node
from tests.kubeutil import fake_cluster
from tests.stackutil import deploy, sample_spec, stack_config, wait_until
from tests.test_kubernetes_e2e import infer, kube_stack
from tests.test_scale_from_zero import expected

GKE_GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODES = [
    # It caches the model, so cold-start locality would pick it for every pod it admits.
    node("gpu-pool-1", cpu="4", memory="8Gi", gpu=1, models="sample", taints=[GKE_GPU_TAINT]),
    node("cpu-pool-1", cpu="4", memory="8Gi"),
]


async def test_a_tainted_gpu_node_takes_gpu_pods_and_only_those(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The GPU node is registered despite its NoSchedule taint; the CPU service's pod goes
    to the untainted node although the GPU node caches its model, and the GPU service's
    pod goes to the GPU node, created with the toleration and the nvidia.com/gpu request."""
    async with fake_cluster(tmp_path, NODES) as cluster, \
            kube_stack(cluster, nats_url, redis_url, tmp_path / "state") as stack:
        await deploy(nats_url, sample_spec())
        await deploy(nats_url, sample_spec("gpu", model="sample",
                                           resources=Resources(cpu=0.5, memory_mb=128, gpu=1)))
        _, cpu_pod, out = await asyncio.wait_for(infer(stack.url, "sample"), timeout=25)
        assert np.allclose(out, expected(), atol=1e-6)
        _, gpu_pod, out = await asyncio.wait_for(infer(stack.url, "gpu"), timeout=25)
        assert np.allclose(out, expected(), atol=1e-6)

        pods = {p["metadata"]["name"]: p for p in cluster.pods()}
        assert pods[cpu_pod]["spec"]["nodeName"] == "cpu-pool-1"
        assert "tolerations" not in pods[cpu_pod]["spec"]
        gpu = pods[gpu_pod]["spec"]
        assert gpu["nodeName"] == "gpu-pool-1"
        assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                       "effect": "NoSchedule"}]
        assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


async def test_two_gpu_pods_on_one_local_node_see_different_gpus(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """One local node with 2 GPUs, a service of 2 pods with 1 GPU each, and a CPU service:
    each GPU pod's CUDA_VISIBLE_DEVICES names its own device, and the CPU pod sees none."""
    seen = tmp_path / "seen"
    seen.mkdir()
    # Each pod writes the variable as it sees it, then serves as the sample does.
    command = ["sh", "-c", f'printf %s "$CUDA_VISIBLE_DEVICES" > "{seen}/$FNPLANE_POD"; '
               f'exec "{sys.executable}" -m examples.sample.server']
    cfg = stack_config(tmp_path / "state")
    cfg = replace(cfg, nodes=replace(cfg.nodes, count=1,
                                     capacity=Resources(cpu=4, memory_mb=4096, gpu=2)))
    two = ScalingSpec(min_scale=2, initial_scale=2, stable_window_s=6.0)
    one = ScalingSpec(min_scale=1, initial_scale=1, stable_window_s=6.0)
    stack = Stack(cfg, nats_url=nats_url, redis_url=redis_url)
    await stack.start()
    try:
        await deploy(nats_url, sample_spec("gpu", command=command, scaling=two,
                                           resources=Resources(cpu=0.5, memory_mb=128, gpu=1)))
        await deploy(nats_url, sample_spec("cpu", command=command,
                                           scaling=one))

        async def written() -> dict[str, str]:
            return {f.name: f.read_text() for f in seen.iterdir()}

        views = await wait_until(written, lambda v: len(v) == 3, timeout=20,
                                 what="three pods to say what they see")
        gpu_views = sorted(v for pod, v in views.items() if pod.startswith("gpu-"))
        cpu_views = [v for pod, v in views.items() if pod.startswith("cpu-")]
        assert gpu_views == ["0", "1"], views
        assert cpu_views == [""], views
    finally:
        await stack.stop()
