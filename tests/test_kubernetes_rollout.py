"""A rolling update runs two node agents at once: against the fake API server on loopback
(kmock-based, tests/fakekube.py; no real cluster can run here) and the kubelet emulator,
with real NATS. Only the holder of the Lease acts, so each pod is created exactly once; the
bind is idempotent; and the pods' image is whatever kustomize `images:` made the agent's."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernel.bus import Bus
from partitions.agents.kubernetes import objects as ko
from partitions.agents.kubernetes.agent import KubernetesBackend
from partitions.leader import Elected, LeaseConfig, Observed, decide
from tests.deployutil import allowed, assert_least_privilege, build, kubectl
from tests.fakekube import ApiCall
from tests.kubelet import node, wait_for
from tests.kubeutil import Cluster, fake_cluster, witness
from tests.stackutil import REPO
from tests.test_kubernetes_backend import start_pod

NODES = [node("n1", cpu="8", memory="16Gi")]


def test_lease_decisions() -> None:
    """Table (pure): expiry counts from when this candidate saw the record change, on its
    own clock, never from the holder's renewTime."""
    held = Observed("other", 15.0, 3, seen_at=100.0)
    cases = [
        (None, 0.0, "create"),
        (Observed("me", 15.0, 0, 100.0), 200.0, "renew"),
        (held, 114.9, "wait"),
        (held, 115.0, "acquire"),
        (Observed("", 1.0, 3, 100.0), 100.0, "acquire"),  # released
    ]
    for observed, now, want in cases:
        assert decide(observed, "me", now) == want, (observed, now)


async def candidate(cluster: Cluster, nats_url: str, identity: str) -> Elected:
    backend = KubernetesBackend(await Bus.connect(nats_url, f"node-{identity}"),
                                cluster.config())
    elected = Elected(backend, LeaseConfig(
        name="fnplane-node", identity=identity, kubeconfig=str(cluster.kubeconfig),
        lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.2))
    await elected.start()
    return elected


def creates(cluster: Cluster) -> list[str]:
    return [c.name or "?" for c in cluster.fake.calls("fnplane-node")
            if c.verb == "create" and c.resource == "pods"]


async def test_two_node_agents_at_once_create_each_pod_exactly_once(
    nats_url: str, tmp_path: Path
) -> None:
    """Both agents of a rolling update start together; one holds the Lease and serves, the
    other waits. Each StartPod makes one Pod, bound once, never deleted. When the old agent
    stops it releases the Lease: the new one takes over at once, adopts the pods without
    creating them again, and serves the next StartPod."""
    async with fake_cluster(tmp_path, NODES) as cluster, \
            witness(nats_url, services={"sample"}) as w:
        a, b = await asyncio.gather(candidate(cluster, nats_url, "old"),
                                    candidate(cluster, nats_url, "new"))
        try:
            await wait_for(lambda: a.leading.is_set() or b.leading.is_set(), timeout=10,
                           what="a leader")
            leader, standby = (a, b) if a.leading.is_set() else (b, a)
            await wait_for(lambda: bool(w.registered), timeout=10, what="nodes registered")
            for pod in ("sample-aaaa0101", "sample-aaaa0102"):
                await start_pod(nats_url, pod, "n1")
            await wait_for(lambda: all("ready" in w.states(p) for p in
                                       ("sample-aaaa0101", "sample-aaaa0102")),
                           timeout=20, what="both pods ready")
            assert not standby.leading.is_set() and not standby.inner.tasks
            assert len(creates(cluster)) == 2

            await leader.stop()  # the rollout ends the old pod: it hands the Lease over
            await wait_for(lambda: standby.leading.is_set(), timeout=5,
                           what="the candidate to take over at once")
            await wait_for(lambda: getattr(standby.inner, "adopted", 0) == 2, timeout=10,
                           what="the pods adopted")
            await start_pod(nats_url, "sample-aaaa0103", "n1")
            await wait_for(lambda: "ready" in w.states("sample-aaaa0103"), timeout=20,
                           what="the third pod ready")
        finally:
            await asyncio.gather(a.stop(), b.stop())
        pods = cluster.fake.calls("fnplane-node")
        assert len([c for c in pods if c.verb == "create" and c.resource == "pods"]) == 3
        assert [c for c in pods if c.verb == "delete"] == []
        assert sorted(cluster.kubelet.started) == [
            "sample-aaaa0101", "sample-aaaa0102", "sample-aaaa0103"]
        held = cluster.fake.get("coordination.k8s.io", "leases", "fnplane-node", "fnplane")
        assert held["spec"]["leaseTransitions"] >= 1
        assert_least_privilege("node", cluster.fake.calls("fnplane-node"))
        assert_least_privilege("node", cluster.fake.calls("fnplane-leader"))


async def test_a_bind_answered_409_for_the_same_node_is_success(
    nats_url: str, tmp_path: Path
) -> None:
    """A retried StartPod whose pod the first attempt already created and bound (the reply
    was lost): create answers 409, bind answers 409 'already assigned' to that same node.
    That is the placement done, not a reason to delete the pod with grace 0."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w:
        backend = KubernetesBackend(await Bus.connect(nats_url, "node-kubernetes"),
                                    cluster.config())
        await backend.start()
        try:
            cluster.fake.pause_watches()  # the agent has not seen the first attempt's pod
            await start_pod(nats_url, "sample-aaaa0201", "n1")
            first = cluster.fake.get("", "pods", "sample-aaaa0201", "fnplane")
            backend.tracker.pods.pop("sample-aaaa0201")  # type: ignore[union-attr]
            await start_pod(nats_url, "sample-aaaa0201", "n1")  # the retry
            assert cluster.fake.get("", "pods", "sample-aaaa0201", "fnplane")["metadata"][
                "uid"] == first["metadata"]["uid"]
            assert "failed" not in w.states("sample-aaaa0201")
        finally:
            await backend.stop()
        calls = cluster.fake.calls("fnplane-node")
        assert [c.verb for c in calls if c.resource == "pods/binding"] == ["create", "create"]
        assert [c for c in calls if c.verb == "delete"] == []
        assert_least_privilege("node", calls)


# ---- the pod image follows kustomize `images:` -------------------------------------------------


def overlay(tmp_path: Path, images: list[dict[str, str]]) -> list[dict[str, Any]]:
    """An overlay of deploy/base as an operator would write it, built by `kubectl kustomize`."""
    d = tmp_path / "overlay"
    d.mkdir()
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy" / "base", d)], "images": images}))
    out = subprocess.run([kubectl(), "kustomize", str(d)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


async def test_an_overlay_setting_only_new_name_yields_pods_of_that_image(
    nats_url: str, tmp_path: Path
) -> None:
    """`images: [{name: fnplane, newName: registry.example/team/fnplane}]` rewrites the node
    agent's container; the agent reads it from its own Pod, so the service pods run it too
    (a FNPLANE_POD_IMAGE literal was left at fnplane:0.1.0). Pods run as a numeric non-root
    user, or as the one the service names."""
    docs = overlay(tmp_path, [{"name": "fnplane", "newName": "registry.example/team/fnplane"}])
    dep = next(d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "fnplane-node")
    template = dep["spec"]["template"]
    image = template["spec"]["containers"][0]["image"]
    assert image == "registry.example/team/fnplane:0.1.0"
    env = {e["name"] for e in template["spec"]["containers"][0]["env"]}
    assert "FNPLANE_POD_IMAGE" not in env and "FNPLANE_POD_NAME" in env
    async with fake_cluster(tmp_path, NODES) as cluster, \
            witness(nats_url, services={"sample", "own"}):
        own = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "fnplane-node-7d9f-abcde", "namespace": "fnplane",
                            "labels": template["metadata"]["labels"]},
               "spec": template["spec"]}
        cluster.fake.put("", "pods", own)
        backend = KubernetesBackend(await Bus.connect(nats_url, "node-kubernetes"),
                                    cluster.config(self_pod="fnplane-node-7d9f-abcde"))
        await backend.start()
        try:
            await start_pod(nats_url, "sample-aaaa0301", "n1")
            await start_pod(nats_url, "own-aaaa0302", "n1", name="own",
                            image="registry.example/vllm:1", run_as_user=1000)
        finally:
            await backend.stop()
        pods = {p["metadata"]["name"]: p for p in cluster.pods()}
        sample, mine = pods["sample-aaaa0301"]["spec"], pods["own-aaaa0302"]["spec"]
        assert sample["containers"][0]["image"] == image
        assert sample["containers"][0]["imagePullPolicy"] == "IfNotPresent"
        assert sample["securityContext"]["runAsUser"] == 10001
        assert mine["containers"][0]["image"] == "registry.example/vllm:1"
        assert (mine["securityContext"]["runAsUser"],
                mine["securityContext"]["runAsNonRoot"]) == (1000, True)
        assert_least_privilege("node", cluster.fake.calls("fnplane-node"))


@pytest.mark.parametrize("uid,non_root", [(10001, True), (0, False)])
def test_pods_always_name_their_user(uid: int, non_root: bool) -> None:
    """runAsNonRoot without runAsUser leaves the kubelet the image's USER: root (most
    inference images) fails CreateContainerConfigError. A uid is always set; root only
    when asked for."""
    sc = ko.security_context(uid, uid)
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (uid, uid, non_root)


def test_single_writers_elect_a_leader_and_may_use_only_their_own_lease() -> None:
    deployments = {d["metadata"]["name"]: d for d in build("base") if d["kind"] == "Deployment"}
    for comp in ("coordinator", "node", "operator"):
        dep = deployments[f"fnplane-{comp}"]
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["FNPLANE_LEADER_LEASE"]["value"] == f"fnplane-{comp}", comp
        group = "coordination.k8s.io"
        assert allowed(comp, ApiCall("update", group, "leases", "fnplane", f"fnplane-{comp}"))
        assert allowed(comp, ApiCall("create", group, "leases", "fnplane", ""))
        others = {"coordinator", "node", "operator"} - {comp}
        assert not any(allowed(comp, ApiCall("update", group, "leases", "fnplane",
                                             f"fnplane-{o}")) for o in others), comp
