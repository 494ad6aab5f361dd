"""The `kubernetes` backend on a shared cluster, against a fake API server on loopback and a
kubelet emulator as strict as a kubelet (tests/fakekube.py, tests/kubelet.py): no real
cluster can run here. Nodes hold pods fnplane did not create — DaemonSets', other tenants',
the control plane's own — and the kubelet admits a pod only if it fits beside all of them
(pkg/kubelet/lifecycle/predicate.go); what it rejects must not go to the same node again."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import numpy as np

from kernel.messages import NodeInfo, Resources
from partitions.agents.kubernetes import capacity as kc
from tests.kubelet import foreign_pod, node, wait_for
from tests.kubeutil import fake_cluster, witness
from tests.stackutil import deploy, sample_spec
from tests.test_kubernetes_backend import backend_on, start_pod
from tests.test_kubernetes_e2e import infer, kube_stack
from tests.test_scale_from_zero import expected


def latest(registered: list[NodeInfo], name: str) -> Resources | None:
    caps = [n.capacity for n in registered if n.name == name]
    return caps[-1] if caps else None


async def test_nodes_are_registered_with_what_the_others_pods_leave(
    nats_url: str, tmp_path: Path
) -> None:
    """Every non-terminal pod bound to a node counts against its allocatable, whoever made
    it: a DaemonSet's (kube-system), another tenant's, fnplane's own control plane (its
    namespace, not managed-by fnplane). Unbound and finished pods hold nothing. A pod that
    arrives, fails or goes re-registers its node with the room that is left (the watch's
    field selector turns a failed pod into DELETED, as the API server does)."""
    async with fake_cluster(tmp_path, [node("n1", cpu="4", memory="8Gi"),
                                       node("n2", cpu="4", memory="8Gi")]) as cluster:
        fake = cluster.fake
        fake.put("", "pods", foreign_pod("ds-n1", "n1", cpu="1", memory="1Gi"))
        fake.put("", "pods", foreign_pod("tenant-a", "n1", namespace="tenant-b",
                                         cpu="1500m", memory="2Gi"))
        fake.put("", "pods", foreign_pod("fnplane-route-0", "n1", namespace="fnplane",
                                         cpu="500m", memory="512Mi"))
        fake.put("", "pods", foreign_pod("unbound", "", cpu="2", phase="Pending"))
        fake.put("", "pods", foreign_pod("done", "n2", cpu="2", phase="Succeeded"))
        async with witness(nats_url) as w, backend_on(cluster, nats_url):
            await wait_for(lambda: {"n1", "n2"} <= set(w.nodes()), timeout=10,
                           what="registrations")
            assert latest(w.registered, "n1") == Resources(cpu=1.0, memory_mb=4608)
            assert latest(w.registered, "n2") == Resources(cpu=4.0, memory_mb=8192)

            # A pending pod bound by another scheduler: the kubelet admits it, it counts.
            fake.put("", "pods", foreign_pod("tenant-c", "n2", namespace="tenant-b",
                                             cpu="2", memory="1Gi", phase="Pending"))
            await wait_for(lambda: latest(w.registered, "n2") == Resources(
                cpu=2.0, memory_mb=7168), timeout=5, what="n2 re-registered")
            await wait_for(lambda: ("tenant-b", "tenant-c") in cluster.kubelet.admitted,
                           timeout=5, what="the kubelet to admit tenant-c")

            failed = copy.deepcopy(fake.get("", "pods", "tenant-a", "tenant-b"))
            failed["status"] = {"phase": "Failed", "reason": "Evicted"}
            fake._write(("", "pods", "tenant-b", "tenant-a"), failed, "MODIFIED")
            fake._write(("", "pods", "kube-system", "ds-n1"),
                        fake.get("", "pods", "ds-n1", "kube-system"), "DELETED")
            await wait_for(lambda: latest(w.registered, "n1") == Resources(
                cpu=3.5, memory_mb=7680), timeout=5, what="n1 re-registered")


async def test_the_kubelet_rejects_what_does_not_fit_and_the_node_offers_none_of_it(
    nats_url: str, tmp_path: Path
) -> None:
    """A pod the kubelet cannot fit beside everything on its node is rejected as a kubelet
    does (phase Failed, reason OutOf<resource>): cpu against a static pod the API does not
    show, the pod count against allocatable `pods`, GPUs held by another tenant. The pod is
    reported stopped with that reason (it never ran: not a failure of the service), and
    its node is registered with none of the resource free until the hold passes, so best
    fit does not choose it again meanwhile. A node whose pod slots are all taken offers
    nothing at all."""
    nodes = [node("n1", cpu="4", memory="8Gi"), node("n2", pods=2),
             node("g1", cpu="8", memory="16Gi", gpu=1)]
    async with fake_cluster(tmp_path, nodes) as cluster:
        cluster.kubelet.run_static("n1", "etcd-n1", {"cpu": "3800m", "memory": "1Gi"})
        for i in range(2):
            cluster.fake.put("", "pods", foreign_pod(f"ds-{i}", "n2", cpu="10m", memory="8Mi"))
        cluster.fake.put("", "pods", foreign_pod("trainer", "g1", namespace="tenant-b",
                                                 cpu="1", memory="1Gi", gpu=1))
        async with witness(nats_url) as w, \
                backend_on(cluster, nats_url, rejection_hold_s=2.0):
            await wait_for(lambda: {"n1", "n2", "g1"} <= set(w.nodes()), timeout=10,
                           what="registrations")
            assert latest(w.registered, "n2") == Resources()  # no pod slot left
            assert latest(w.registered, "g1") == Resources(cpu=7.0, memory_mb=15360)
            assert latest(w.registered, "n1") == Resources(cpu=4.0, memory_mb=8192)

            # Placed anyway (as a stale view would): the kubelet says no.
            await start_pod(nats_url, "a-0001", "n1", name="a")
            await start_pod(nats_url, "b-0001", "n2", name="b")
            await start_pod(nats_url, "g-0001", "g1", name="g",
                            resources=Resources(cpu=1, memory_mb=256, gpu=1))
            await wait_for(lambda: all("stopped" in w.states(p)
                                       for p in ("a-0001", "b-0001", "g-0001")),
                           timeout=10, what="three rejections")
            assert w.last("a-0001").reason == (
                "OutOfcpu: Pod was rejected: Node didn't have enough resource: cpu, "
                "requested: 500, used: 3800, capacity: 4000")
            assert w.last("b-0001").reason.startswith("OutOfpods: Pod was rejected")
            assert w.last("g-0001").reason.startswith("OutOfnvidia.com/gpu: Pod was rejected")
            assert sorted(r for _, r in cluster.kubelet.rejected) == [
                "OutOfcpu", "OutOfnvidia.com/gpu", "OutOfpods"]
            assert cluster.kubelet.started == []
            # The kubelet knows better than our view: no cpu on n1 until the hold passes.
            await wait_for(lambda: latest(w.registered, "n1") == Resources(
                cpu=0.0, memory_mb=8192), timeout=5, what="n1 held")
            await wait_for(lambda: latest(w.registered, "n1") == Resources(
                cpu=4.0, memory_mb=8192), timeout=10, what="n1's hold to pass")


def test_room_table() -> None:
    """What a node offers fnplane (pure): allocatable less the others' requests; nothing
    of a resource the kubelet said was short; nothing at all with no pod slot left."""
    occ = kc.Occupancy("fnplane", hold_s=30.0)
    occ.on_list([foreign_pod("ds", "n1", cpu="250m", memory="100Mi"),
                 foreign_pod("gpu", "n1", namespace="t", cpu="1", memory="1Gi", gpu=1)])
    alloc = Resources(cpu=4.0, memory_mb=8192, gpu=2)
    ours = Resources(cpu=1.0, memory_mb=512)
    assert occ.capacity("n1", alloc, 110, ours, 1) == Resources(cpu=2.75, memory_mb=7068,
                                                                 gpu=1)
    assert occ.capacity("n1", alloc, 3, ours, 1) == ours  # 2 others + 1 ours = 3 slots
    occ.rejected("n1", "nvidia.com/gpu", now=100.0)
    assert occ.capacity("n1", alloc, 110, ours, 1).gpu == 0
    assert occ.expire(129.0) == set() and occ.expire(131.0) == {"n1"}
    occ.rejected("n1", "memory", now=200.0)
    assert occ.capacity("n1", alloc, 110, ours, 1).memory_mb == 512
    assert occ.on_pod("DELETED", foreign_pod("ds", "n1")) == {"n1"}
    assert occ.full == {}  # room came back on n1: the kubelet may admit again
    assert kc.rejection("OutOfnvidia.com/gpu: Pod was rejected: ...") == "nvidia.com/gpu"
    assert kc.rejection("pod exited with code 1") == ""
    assert kc.requests_of({"spec": {"containers": [
        {"resources": {"limits": {"cpu": "100m", "memory": "1M"}}},
        {"resources": {"requests": {"cpu": "0.0005"}}}], "overhead": {"memory": "1Mi"}}}) \
        == Resources(cpu=0.101, memory_mb=2)


async def test_a_kubelet_rejection_sends_the_retry_to_another_node(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """End to end through the activator: the node caching the model (best by locality)
    runs a static pod the API does not show, so its kubelet rejects the first pod
    (OutOfcpu). The retry goes to the other node and the request is answered; the kubelet
    rejected exactly once."""
    nodes = [node("worker-1", cpu="4", memory="8Gi"),
             node("worker-2", cpu="4", memory="8Gi", models="sample")]
    async with fake_cluster(tmp_path, nodes) as cluster:
        cluster.kubelet.run_static("worker-2", "kube-proxy", {"cpu": "3800m"})
        async with kube_stack(cluster, nats_url, redis_url, tmp_path / "state") as stack:
            await deploy(nats_url, sample_spec())
            _, pod, out = await asyncio.wait_for(infer(stack.url), timeout=25)
            assert np.allclose(out, expected(), atol=1e-6)
            assert cluster.fake.get("", "pods", pod, "fnplane")["spec"]["nodeName"] == \
                "worker-1"
            assert [r for _, r in cluster.kubelet.rejected] == ["OutOfcpu"]
