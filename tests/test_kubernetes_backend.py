"""The `kubernetes` node backend against a fake API server on loopback (kmock-based, see
tests/fakekube.py) and a kubelet emulator running pods as local processes: no real cluster
can run here. The backend uses the real `kubernetes` client over real HTTP and the real
nats-server; a witness stands in for the coordinator and the registry on NATS."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import Resources, StartPod, StopPod, Taint
from partitions.agents.kubernetes import objects as ko
from partitions.agents.kubernetes.agent import KubernetesBackend
from tests.deployutil import assert_least_privilege
from tests.kubelet import node, wait_for
from tests.kubeutil import Cluster, fake_cluster, witness
from tests.stackutil import sample_spec

NODES = [
    node("n1", cpu="4", memory="8Gi", models="sample, big ,", labels={"zone": "a"}),
    node("n2", unschedulable=True),
    node("n3", taints=[{"key": "dedicated", "value": "infra", "effect": "NoSchedule"}]),
    node("n4", ready=False),
    node("gpu-1.example.com", cpu="7910m", memory="16318180Ki", gpu=2),
]


@asynccontextmanager
async def backend_on(cluster: Cluster, nats_url: str, **config: object
                     ) -> AsyncIterator[KubernetesBackend]:
    b = KubernetesBackend(await Bus.connect(nats_url, "node-kubernetes"), cluster.config(**config))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
        # Least privilege, checked not assumed: every call this backend made is allowed
        # by the node backend's Role in deploy/.
        assert_least_privilege("node", cluster.fake.calls("fnplane-node"))


async def start_pod(nats_url: str, pod: str, node_name: str, **spec: object) -> None:
    bus = await Bus.connect(nats_url, "test-schedule")
    try:
        now = time.time()
        # As `schedule` sends it: its partition and epoch (no map published here).
        start = StartPod(pod=pod, spec=sample_spec(**spec), node=node_name, requested_at=now,
                         placed_at=now, partition=0, epoch=1)
        await bus.call(ep.NODE_START, start, timeout=10, node=node_name)
    finally:
        await bus.close()


async def stop_pod(nats_url: str, pod: str, service: str, node_name: str) -> None:
    bus = await Bus.connect(nats_url, "test-scale")
    try:
        await bus.call(ep.NODE_STOP, StopPod(pod=pod, service=service), timeout=10,
                       node=node_name)
    finally:
        await bus.close()


async def test_nodes_come_from_node_objects_and_unschedulable_ones_take_no_pods(
    nats_url: str, tmp_path: Path
) -> None:
    """Allocatable cpu/memory/nvidia.com/gpu, labels and the fnplane.dev/models annotation
    become NodeInfo; cordoned and NotReady nodes are not registered and refuse StartPod
    with the reason; a NoSchedule-tainted node is registered with its taints and refuses
    a pod that does not tolerate them. Node names with dots become NATS-safe."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url):
        await wait_for(lambda: len(w.registered) >= 3, timeout=10, what="registrations")
        nodes = w.nodes()
        assert set(nodes) == {"n1", "n3", "gpu-1_example_com"}
        assert nodes["n3"].taints == [Taint(key="dedicated", value="infra",
                                            effect="NoSchedule")]
        assert nodes["n1"].capacity == Resources(cpu=4.0, memory_mb=8192, gpu=0)
        assert nodes["n1"].models == ["big", "sample"]
        assert nodes["n1"].labels["zone"] == "a" and nodes["n1"].backend == "kubernetes"
        assert nodes["gpu-1_example_com"].capacity == Resources(cpu=7.91, memory_mb=15935,
                                                                 gpu=2)
        for name, why in (("n2", "cordoned"), ("n3", "dedicated=infra:NoSchedule"),
                          ("n4", "not Ready")):
            with pytest.raises(RemoteError) as err:
                await start_pod(nats_url, f"s-{name}", name)
            assert err.value.code == ErrorCode.UNAVAILABLE and why in err.value.message
        assert cluster.pods() == []


async def test_start_pod_creates_binds_and_reports_ready_then_stop_deletes(
    nats_url: str, tmp_path: Path
) -> None:
    """StartPod → a Pod with schedulerName fnplane, the pod contract (PORT, HOST, command,
    env, requests/limits, readinessProbe), bound through pods/binding; the watch sees the
    Ready condition → `ready` at http://{podIP}:{port}. StopPod → delete → terminating,
    then stopped once the kubelet confirmed."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url):
        await start_pod(nats_url, "sample-aaaa0001", "gpu-1_example_com",
                        env={"SAMPLE_LATENCY_MS": "1"})
        await wait_for(lambda: "ready" in w.states("sample-aaaa0001"), timeout=20,
                       what="the pod to be ready")
        assert w.states("sample-aaaa0001") == ["starting", "ready"]
        pod = cluster.fake.get("", "pods", "sample-aaaa0001", "fnplane")
        assert pod["spec"]["schedulerName"] == "fnplane"
        assert pod["spec"]["nodeName"] == "gpu-1.example.com"
        assert pod["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "fnplane", "fnplane.dev/service": "sample",
            "fnplane.dev/pod": "sample-aaaa0001"}
        c = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in c["env"]}
        port = int(env["PORT"])
        assert env["HOST"] == "0.0.0.0" and env["SAMPLE_LATENCY_MS"] == "1"
        assert c["command"] == sample_spec().command
        assert c["resources"] == {"requests": {"cpu": "500m", "memory": "128Mi"},
                                  "limits": {"cpu": "500m", "memory": "128Mi"}}
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
        binds = [x for x in cluster.fake.calls("fnplane-node") if x.resource == "pods/binding"]
        assert [(b.verb, b.name) for b in binds] == [("create", "sample-aaaa0001")]

        ready = w.last("sample-aaaa0001")
        assert ready.url == f"http://127.0.0.1:{port}" and ready.node == "gpu-1_example_com"
        t = ready.timeline
        assert t.requested_at <= t.placed_at <= t.spawned_at <= t.ready_at
        async with aiohttp.ClientSession() as http, http.get(f"{ready.url}/v2/health/ready") as r:
            assert r.status == 200

        await stop_pod(nats_url, "sample-aaaa0001", "sample", "gpu-1_example_com")
        await wait_for(lambda: "stopped" in w.states("sample-aaaa0001"), timeout=10,
                       what="the pod to stop")
        assert w.states("sample-aaaa0001") == ["starting", "ready", "terminating", "stopped"]
        assert cluster.pods() == []
        assert "sample-aaaa0001" not in cluster.kubelet.containers


async def test_a_pod_that_exits_is_failed_with_its_reason_and_output(
    nats_url: str, tmp_path: Path
) -> None:
    """The container exits → phase Failed with a terminated state → `failed` with the exit
    code and the tail of pods/log; the Pod is deleted."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url):
        await start_pod(nats_url, "broken-aaaa0002", "n1", name="broken",
                        env={"SAMPLE_FAIL_ON_START": "1"})
        await wait_for(lambda: "failed" in w.states("broken-aaaa0002"), timeout=20,
                       what="the failure")
        ev = w.last("broken-aaaa0002")
        assert "pod exited with code 3" in ev.reason
        assert "SAMPLE_FAIL_ON_START" in ev.log_tail
        await wait_for(lambda: not cluster.pods(), timeout=10, what="the failed pod deleted")


async def test_a_service_image_is_the_pods_image_else_the_backends(
    nats_url: str, tmp_path: Path
) -> None:
    """A user's own server (MLServer, Triton, a FastAPI app) runs from its own image; a spec
    without one runs the backend's image, which carries the sample model. Fake API server:
    no real cluster can run here. (The witness answers the node registrations: without it the
    backend waits out its registration retries first, ~45 s.)"""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url), \
            backend_on(cluster, nats_url):
        await start_pod(nats_url, "own-aaaa0005", "n1", name="own",
                        image="registry.example/team/model:1.2")
        await start_pod(nats_url, "sample-aaaa0006", "n1")
        images = {p["metadata"]["name"]: p["spec"]["containers"][0]["image"]
                  for p in cluster.pods()}
    assert any(img == "registry.example/team/model:1.2" and "own" in name
               for name, img in images.items()), images
    assert any(img != "registry.example/team/model:1.2" and "sample" in name
               for name, img in images.items()), images


async def test_a_pod_not_ready_within_its_startup_timeout_is_failed(
    nats_url: str, tmp_path: Path
) -> None:
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url):
        await start_pod(nats_url, "slow-aaaa0003", "n1", name="slow", startup_timeout_s=1.0,
                        env={"SAMPLE_STARTUP_DELAY_MS": "20000"})
        await wait_for(lambda: "failed" in w.states("slow-aaaa0003"), timeout=15,
                       what="the startup timeout")
        assert w.last("slow-aaaa0003").reason == "not ready within 1s"
        await wait_for(lambda: not cluster.pods(), timeout=10, what="the slow pod deleted")


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_relists_reregisters_changed_nodes_and_notices_deleted_pods(
    nats_url: str, tmp_path: Path, as_http_status: bool
) -> None:
    """Watches lose events (paused), then end and the history is compacted: resuming from
    the old resourceVersion gets 410 Gone (as an ERROR event, or as the HTTP status), so the
    backend lists again. From the list it re-registers the node whose models changed,
    registers the new node, and reports the pod deleted meanwhile as stopped."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url) as b:
        await start_pod(nats_url, "sample-aaaa0004", "n1")
        await wait_for(lambda: "ready" in w.states("sample-aaaa0004"), timeout=20,
                       what="the pod to be ready")
        cluster.fake.expired_as_http_status = as_http_status
        before = len(w.registered)

        cluster.fake.pause_watches()
        n1 = cluster.fake.get("", "nodes", "n1")
        n1["metadata"]["annotations"]["fnplane.dev/models"] = "sample,llama"
        cluster.fake.put("", "nodes", n1)
        cluster.fake.put("", "nodes", node("n6", cpu="2", memory="2Gi"))
        cluster.kubelet.nodes.add("n6")
        pod = cluster.fake.get("", "pods", "sample-aaaa0004", "fnplane")
        cluster.fake._write(("", "pods", "fnplane", "sample-aaaa0004"), pod, "DELETED")
        cluster.fake.sever_watches(compact=True)

        await wait_for(lambda: {"n1", "n6"} <= {n.name for n in w.registered[before:]},
                       timeout=15, what="re-registration after the re-list")
        assert w.nodes()["n1"].models == ["llama", "sample"]
        assert w.nodes()["n6"].capacity == Resources(cpu=2.0, memory_mb=2048)
        await wait_for(lambda: "stopped" in w.states("sample-aaaa0004"), timeout=10,
                       what="the deleted pod reported")
        assert sum(x.relists for x in b.watches) >= 2  # nodes and pods both listed again
        watches = [x for x in cluster.fake.calls("fnplane-node") if x.verb == "watch"]
        assert len(watches) >= 4
        # And it watches again: a node change now arrives without a list.
        relists = sum(x.relists for x in b.watches)
        cluster.fake.put("", "nodes", node("n7"))
        await wait_for(lambda: "n7" in w.nodes(), timeout=10, what="n7 by watch")
        assert sum(x.relists for x in b.watches) == relists


async def test_restarted_backend_adopts_its_pods_and_cleans_up_leftovers(
    nats_url: str, tmp_path: Path
) -> None:
    """A new backend (a restarted control plane) reports the running pod as ready at the
    same URL without creating a Pod, deletes a Pod that was never bound (its creator died
    between create and bind) and the pods of a service the registry no longer knows."""
    async with fake_cluster(tmp_path, NODES) as cluster, \
            witness(nats_url, services={"sample"}) as w:
        async with backend_on(cluster, nats_url):
            await start_pod(nats_url, "sample-aaaa0005", "n1")
            await start_pod(nats_url, "gone-aaaa0006", "n1", name="gone")
            await wait_for(lambda: "ready" in w.states("sample-aaaa0005")
                           and "ready" in w.states("gone-aaaa0006"), timeout=20,
                           what="both pods ready")
        first = w.last("sample-aaaa0005")
        creates = [x for x in cluster.fake.calls("fnplane-node") if x.verb == "create"]
        leftover = ko.pod_manifest(
            StartPod(pod="sample-aaaa0007", spec=sample_spec(), node="n1", requested_at=0.0,
                     placed_at=0.0),
            namespace="fnplane", image="fnplane", port=1)
        cluster.fake.put("", "pods", leftover)
        w.events.clear()

        async with backend_on(cluster, nats_url) as b:
            assert b.adopted == 2
            await wait_for(lambda: "stopped" in w.states("gone-aaaa0006"), timeout=10,
                           what="the orphan of a deleted service stopped")
            await wait_for(lambda: cluster.fake.get("", "pods", "sample-aaaa0007",
                                                    "fnplane") == {},
                           timeout=10, what="the never-bound pod deleted")
            adopted = w.last("sample-aaaa0005")
            assert adopted.state == "ready" and adopted.url == first.url
            assert adopted.container_concurrency == first.container_concurrency
            assert adopted.resources == first.resources
            assert adopted.timeline.requested_at == pytest.approx(first.timeline.requested_at)
            assert w.states("gone-aaaa0006") == ["ready", "terminating", "stopped"]
            assert [x for x in cluster.fake.calls("fnplane-node") if x.verb == "create"
                    and x.resource == "pods"] == [c for c in creates if c.resource == "pods"]
            assert cluster.kubelet.started == ["sample-aaaa0005", "gone-aaaa0006"]


def test_node_without_ready_condition_or_with_prefer_no_schedule() -> None:
    """Table: which Node objects take pods at all (pure); a taint keeps off only the pods
    that do not tolerate it (tests/test_tolerations.py)."""
    cases = [
        (node("a"), ""),
        (node("b", taints=[{"key": "k", "effect": "PreferNoSchedule"}]), ""),
        (node("c", taints=[{"key": "k", "effect": "NoExecute"}]), ""),
        ({"metadata": {"name": "d"}, "status": {}}, "not Ready (Ready=Unknown)"),
    ]
    for obj, want in cases:
        assert ko.unschedulable_reason(obj) == want, obj["metadata"]["name"]


def test_pod_status_table() -> None:
    """Table: what the backend reads from Pod status (pure)."""
    def pod(status: dict, **meta: object) -> dict:
        return {"metadata": {"name": "p", **meta}, "spec": {"nodeName": "n"}, "status": status}

    ready = {"podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]}
    cases = [
        (pod({}), (False, False, "")),
        (pod(ready), (True, False, "")),
        (pod(ready, deletionTimestamp="2026-01-01T00:00:00Z"), (True, True, "")),
        (pod({"containerStatuses": [{"state": {"terminated": {"exitCode": 137,
                                                               "reason": "OOMKilled"}}}]}),
         (False, False, "pod exited with code 137 (OOMKilled)")),
        (pod({"containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff",
                                                            "message": "no such image"}}}]}),
         (False, False, "ImagePullBackOff: no such image")),
        (pod({"containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}),
         (False, False, "")),
        (pod({"phase": "Failed", "reason": "OutOfcpu", "message": "Node didn't have enough"}),
         (False, False, "OutOfcpu: Node didn't have enough")),
    ]
    for obj, (is_ready, terminating, failed) in cases:
        seen = ko.observe_pod(obj)
        assert (seen.ready, seen.terminating, seen.failed) == (is_ready, terminating, failed)


async def test_a_storage_uri_gives_the_pod_kserves_init_container_and_volume(
    nats_url: str, tmp_path: Path
) -> None:
    """KServe's storage initializer: an init container fetching the URI into an emptyDir at
    /mnt/models, which the server mounts read-only and finds in MODEL_DIR. Fake API server:
    no real cluster can run here (its kubelet emulator runs no init containers)."""
    uri = "https://models.example/iris/weights.npz"
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url), \
            backend_on(cluster, nats_url):
        await start_pod(nats_url, "iris-aaaa0009", "n1", name="iris", storage_uri=uri)
        pod = next(p for p in cluster.pods() if p["metadata"]["name"] == "iris-aaaa0009")
    init = pod["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["storage-initializer"]
    assert init[0]["args"] == [uri, "/mnt/models"]
    assert {"name": "FNPLANE_MODEL_HOSTS", "value": "models.example"} in init[0]["env"]
    assert init[0]["volumeMounts"] == [{"name": "kserve-provision-location",
                                        "mountPath": "/mnt/models"}]
    main = pod["spec"]["containers"][0]
    assert {"name": "kserve-provision-location", "mountPath": "/mnt/models",
            "readOnly": True} in main["volumeMounts"]
    assert {"name": "MODEL_DIR", "value": "/mnt/models"} in main["env"]
    assert {"name": "kserve-provision-location", "emptyDir": {}} in pod["spec"]["volumes"]
