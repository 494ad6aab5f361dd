"""Ready → not Ready on the `kubernetes` backend (issue 14): a Pod whose Ready condition turns
False, or whose Node turns NotReady (a spot GPU reclaimed, a kubelet partitioned), is
`unready` — alive, counted, withdrawn from traffic — and `ready` again when both are Ready.
Against the fake API server and the kubelet emulator, which runs readiness probes on their
`periodSeconds` and can take a node NotReady: no real cluster can run here. The witness
stands in for the coordinator and the registry on NATS."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kernel.messages import ScalingSpec
from tests.kubelet import node, wait_for
from tests.kubeutil import fake_cluster, witness
from tests.stackutil import deploy, describe, sample_spec, wait_until
from tests.test_kubernetes_backend import NODES, backend_on, start_pod
from tests.test_kubernetes_e2e import kube_stack
from tests.test_unready import burst, pods_of, state_of


def ready_condition(pod: dict) -> str:
    return next((c["status"] for c in pod["status"].get("conditions") or []
                 if c["type"] == "Ready"), "")


async def test_a_pod_whose_ready_condition_flips_is_unready_then_ready(
    nats_url: str, tmp_path: Path
) -> None:
    """The kubelet's readiness probe fails `failureThreshold` times (period 1 s, the least a
    Pod takes): Ready=False on the Pod, `unready` from the backend; it passes again: Ready,
    `ready`. The pod is neither failed nor deleted on the way."""
    flag = tmp_path / "unready-flag"
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url):
        await start_pod(nats_url, "flappy-aaaa0001", "n1", name="flappy",
                        env={"SAMPLE_UNREADY_FILE": str(flag)},
                        readiness_period_s=1.0, readiness_failure_threshold=1)
        await wait_for(lambda: "ready" in w.states("flappy-aaaa0001"), timeout=20,
                       what="the pod to be ready")
        flag.touch()
        await wait_for(lambda: "unready" in w.states("flappy-aaaa0001"), timeout=10,
                       what="the pod reported unready")
        pod = cluster.fake.get("", "pods", "flappy-aaaa0001", "fnplane")
        assert ready_condition(pod) == "False" and pod["status"]["phase"] == "Running"
        assert "Ready=False" in w.last("flappy-aaaa0001").reason

        flag.unlink()
        await wait_for(lambda: w.states("flappy-aaaa0001")[-1:] == ["ready"], timeout=10,
                       what="the pod ready again")
        assert w.states("flappy-aaaa0001") == ["starting", "ready", "unready", "ready"]
        assert w.last("flappy-aaaa0001").url.startswith("http://127.0.0.1:")
        assert [p["metadata"]["name"] for p in cluster.pods()] == ["flappy-aaaa0001"]


async def test_a_notready_node_makes_its_pods_unready_until_it_is_back(
    nats_url: str, tmp_path: Path
) -> None:
    """The node's kubelet goes silent (Ready=Unknown, as the node lifecycle controller
    writes): the Pod still says Ready=True — nobody is left to say otherwise — yet its pod
    is `unready` at once; the node Ready again: `ready` again."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url):
        await start_pod(nats_url, "sample-aaaa0002", "n1")
        await wait_for(lambda: "ready" in w.states("sample-aaaa0002"), timeout=20,
                       what="the pod to be ready")

        await cluster.kubelet.node_not_ready("n1")
        await wait_for(lambda: "unready" in w.states("sample-aaaa0002"), timeout=10,
                       what="the pod reported unready")
        assert "node n1 is not Ready (Ready=Unknown)" in w.last("sample-aaaa0002").reason
        assert ready_condition(cluster.fake.get("", "pods", "sample-aaaa0002",
                                                "fnplane")) == "True"

        await cluster.kubelet.node_ready("n1")
        await wait_for(lambda: w.states("sample-aaaa0002")[-1:] == ["ready"], timeout=10,
                       what="the pod ready again")
        assert w.states("sample-aaaa0002") == ["starting", "ready", "unready", "ready"]


# Each node has room for one sample pod (0.5 cpu), so two pods land on two nodes.
ONE_POD_NODES = [node("worker-1", cpu="700m", memory="1Gi"),
                 node("worker-2", cpu="700m", memory="1Gi")]


async def test_a_notready_nodes_pods_get_no_traffic_and_are_not_replaced(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Through the whole stack and the activator: two pods on two nodes; one node goes
    NotReady (a spot GPU node reclaimed): every request goes to the other pod, no third
    pod is created; the node back, its pod serves again."""
    spec = sample_spec(scaling=ScalingSpec(min_scale=2, max_scale=2, initial_scale=2,
                                           stable_window_s=6.0, scale_to_zero_grace_s=1.0,
                                           target_burst_capacity=-1.0),
                       env={"SAMPLE_LATENCY_MS": "30"})
    async with fake_cluster(tmp_path, ONE_POD_NODES) as cluster, \
            kube_stack(cluster, nats_url, redis_url, tmp_path / "state") as stack:
        await deploy(nats_url, spec)
        st = await wait_until(lambda: describe(nats_url, "sample"),
                              lambda s: s.ready_pods == 2, timeout=30, what="two ready pods")
        node_of = {p.pod: p.node for p in st.pods}
        a, b = sorted(node_of)
        assert node_of[a] != node_of[b]
        await wait_until(lambda: burst(stack.url), lambda s: pods_of(s) == {a, b},
                         timeout=15, what="both pods serving")

        await cluster.kubelet.node_not_ready(node_of[a])
        await wait_until(lambda: describe(nats_url, "sample"),
                         lambda s: state_of(s, a) == "unready", timeout=10,
                         what=f"{a} on the NotReady node reported unready")
        await asyncio.sleep(0.3)  # the endpoint set on its way from route to the activator
        for _ in range(3):
            served = await burst(stack.url)
            assert pods_of(served) == {b}, f"{a} got requests on a NotReady node: {served}"
        st = await describe(nats_url, "sample")
        assert sorted(p.pod for p in st.pods) == [a, b] and st.ready_pods == 1
        assert sorted(p["metadata"]["name"] for p in cluster.pods()) == [a, b]

        await cluster.kubelet.node_ready(node_of[a])
        await wait_until(lambda: burst(stack.url), lambda s: a in pods_of(s), timeout=10,
                         what=f"{a} serving again")
        assert sorted(p["metadata"]["name"] for p in cluster.pods()) == [a, b]
