"""The `kubernetes` backend when the cluster is slow or flaky, against a fake API server on
loopback that injects timeouts, 429s and 5xx on chosen verbs, and a kubelet emulator that
pulls images slowly or fails to (tests/fakekube.py, tests/kubelet.py): no real cluster can
run here. Every pod ends reported and accounted: none is left `creating`, running unseen,
or undeleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.errors import ErrorCode, RemoteError
from partitions.agents.kubernetes import objects as ko
from tests.kubelet import PULL_DENIED, PULL_NOT_FOUND, PULL_RATE_LIMITED, PullPlan, node, wait_for
from tests.kubeutil import fake_cluster, witness
from tests.test_kubernetes_backend import backend_on, start_pod, stop_pod

NODES = [node("n1", cpu="16", memory="32Gi")]
NODE_UA = "fnplane-node"


def pods_named(cluster, name: str) -> list[dict]:
    return [p for p in cluster.pods() if p["metadata"]["name"] == name]


async def test_image_pulls_have_their_own_deadline_and_only_hopeless_errors_are_fatal(
    nats_url: str, tmp_path: Path
) -> None:
    """A multi-GB image pulls for longer than the service's startup timeout: the pod still
    becomes ready (the startup timeout runs once the container runs). A registry that
    answers 429 twice: the kubelet backs off and pulls; the pod becomes ready. A registry
    that keeps answering 429: failed at the pull deadline, with the registry's message. An
    image that does not exist, or is denied: failed at once, without waiting for it."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url, pull_timeout_s=4.0):
        pulls = cluster.kubelet.pulls
        pulls["reg.example/big:1"] = PullPlan(delay_s=2.0)
        pulls["reg.example/busy:1"] = PullPlan(errors=[PULL_RATE_LIMITED] * 2)
        pulls["reg.example/limited:1"] = PullPlan(errors=[PULL_RATE_LIMITED], forever=True,
                                                  backoff_s=0.3)
        pulls["reg.example/typo:1"] = PullPlan(errors=[PULL_NOT_FOUND], forever=True)
        pulls["reg.example/private:1"] = PullPlan(errors=[PULL_DENIED], forever=True)
        cases = {"big": "reg.example/big:1", "busy": "reg.example/busy:1",
                 "limited": "reg.example/limited:1", "typo": "reg.example/typo:1",
                 "private": "reg.example/private:1"}
        for name, image in cases.items():
            await start_pod(nats_url, f"{name}-0001", "n1", name=name, image=image,
                            startup_timeout_s=1.5)
        await wait_for(lambda: all(set(w.states(f"{n}-0001")) & {"ready", "failed"}
                                   for n in cases), timeout=20, what="every pod settled")
        assert w.states("big-0001") == ["starting", "ready"]
        assert w.states("busy-0001") == ["starting", "ready"]
        limited = w.last("limited-0001")
        assert limited.state == "failed"
        assert limited.reason.startswith("image not pulled within 4s: ")
        assert "429 Too Many Requests" in limited.reason
        for name in ("typo", "private"):
            ev = w.last(f"{name}-0001")
            assert ev.state == "failed" and ev.reason.startswith("ErrImagePull: "), ev.reason
            # Failed as soon as the kubelet said so, not at the pull deadline.
            assert ev.ts - ev.timeline.spawned_at < 3.0
        assert "not found" in w.last("typo-0001").reason
        assert "pull access denied" in w.last("private-0001").reason
        await wait_for(lambda: sorted(p["metadata"]["name"] for p in cluster.pods())
                       == ["big-0001", "busy-0001"], timeout=10, what="failed pods deleted")


def test_pull_errors_table() -> None:
    """Which image pull errors no retry fixes (pure). An image's own name may contain any
    word: only the registry's words count."""
    for image in ("r.example/m:1", "r.example/denied-not-found:1"):
        assert ko.hopeless_pull(PULL_NOT_FOUND.format(image=image))
        assert ko.hopeless_pull(PULL_DENIED.format(image=image))
        assert not ko.hopeless_pull(PULL_RATE_LIMITED.format(image=image))
        assert not ko.hopeless_pull(f'Back-off pulling image "{image}"')
    assert not ko.hopeless_pull("")
    assert ko.observe_pod({"status": {"containerStatuses": [{"state": {"waiting": {
        "reason": "ErrImagePull", "message": PULL_RATE_LIMITED}}}]}}).failed == ""


async def test_uncertain_creates_and_binds_are_settled_and_429s_waited_out(
    nats_url: str, tmp_path: Path
) -> None:
    """The create or the bind times out after the API server applied it (the answer is
    lost), or the API answers 429 with Retry-After: each StartPod still succeeds, within
    `schedule`'s wait, and each pod is created and bound once and becomes ready. Creates
    that time out without being applied until the budget runs out: StartPod fails
    UNAVAILABLE and nothing is left behind — no Pod, no pod stuck `creating`."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url, request_timeout_s=1.0, start_timeout_s=4.0) as b:
        fake = cluster.fake
        fake.inject("create", "pods", hang_s=1.5, applied=True, user_agent=NODE_UA)
        await start_pod(nats_url, "lost-create-0001", "n1", name="lost-create")
        fake.inject("create", "pods/binding", hang_s=1.5, applied=True, user_agent=NODE_UA)
        await start_pod(nats_url, "lost-bind-0001", "n1", name="lost-bind")
        fake.inject("create", "pods", status=429, times=2, retry_after_s=1, user_agent=NODE_UA)
        await start_pod(nats_url, "throttled-0001", "n1", name="throttled")
        fake.inject("create", "pods/binding", status=503, user_agent=NODE_UA)
        await start_pod(nats_url, "unavailable-0001", "n1", name="unavailable")
        # Every create hangs past the timeout after being applied: the watch settles it.
        fake.inject("create", "pods", hang_s=1.5, applied=True, times=10, user_agent=NODE_UA)
        await start_pod(nats_url, "watched-0001", "n1", name="watched")
        fake.faults.clear()
        started = ["lost-create-0001", "lost-bind-0001", "throttled-0001",
                   "unavailable-0001", "watched-0001"]
        await wait_for(lambda: all("ready" in w.states(p) for p in started), timeout=20,
                       what="every pod ready")
        for p in started:
            assert len(pods_named(cluster, p)) == 1
            assert w.states(p) == ["starting", "ready"], p
        assert sorted(cluster.kubelet.started) == sorted(started)

        fake.inject("create", "pods", hang_s=1.5, times=10, user_agent=NODE_UA)
        with pytest.raises(RemoteError) as err:
            await start_pod(nats_url, "never-0001", "n1", name="never")
        assert err.value.code is ErrorCode.UNAVAILABLE
        fake.faults.clear()
        assert "never-0001" not in b.pods
        assert not pods_named(cluster, "never-0001")
        assert not [p for p in b.pods.values() if p.state == "creating"]


async def test_an_unsettled_bind_is_abandoned_and_its_pod_deleted(
    nats_url: str, tmp_path: Path
) -> None:
    """Binds that never answer within the budget: StartPod fails (so `schedule` releases
    the room), and the Pod that was created is deleted, not left unbound or running."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url, request_timeout_s=1.0, start_timeout_s=3.0) as b:
        cluster.fake.inject("create", "pods/binding", hang_s=1.5, times=10,
                            user_agent=NODE_UA)
        with pytest.raises(RemoteError) as err:
            await start_pod(nats_url, "unbound-0001", "n1", name="unbound")
        assert err.value.code is ErrorCode.UNAVAILABLE
        cluster.fake.faults.clear()
        await wait_for(lambda: not pods_named(cluster, "unbound-0001"), timeout=10,
                       what="the abandoned pod deleted")
        assert "unbound-0001" not in b.pods and w.states("unbound-0001") == []
        assert cluster.kubelet.started == []


async def test_failed_deletes_are_retried_and_a_timeout_never_ends_the_sweep(
    nats_url: str, tmp_path: Path
) -> None:
    """A StopPod whose DELETE gets a 500: the sweep tries again until the API accepts, and
    the pod ends stopped. A pod past its startup timeout whose DELETE times out (inside
    the sweep): it is deleted by a later round, and the sweep still fails the next slow
    pod on time."""
    async with fake_cluster(tmp_path, NODES) as cluster, witness(nats_url) as w, \
            backend_on(cluster, nats_url, request_timeout_s=0.5):
        fake = cluster.fake
        await start_pod(nats_url, "sample-0001", "n1")
        await wait_for(lambda: "ready" in w.states("sample-0001"), timeout=20,
                       what="the pod ready")
        failing = fake.inject("delete", "pods", status=500, times=2, user_agent=NODE_UA)
        await stop_pod(nats_url, "sample-0001", "sample", "n1")
        await wait_for(lambda: "stopped" in w.states("sample-0001"), timeout=15,
                       what="the pod stopped after retried deletes")
        assert failing.hits == 2
        assert w.states("sample-0001") == ["starting", "ready", "terminating", "stopped"]

        # urllib3 tries an idempotent DELETE 4 times on read timeouts: all of them hang.
        hung = fake.inject("delete", "pods", hang_s=1.0, times=4, user_agent=NODE_UA)
        await start_pod(nats_url, "slow-0001", "n1", name="slow", startup_timeout_s=1.0,
                        env={"SAMPLE_STARTUP_DELAY_MS": "30000"})
        await wait_for(lambda: "failed" in w.states("slow-0001"), timeout=10,
                       what="the first slow pod failed")
        await wait_for(lambda: hung.hits == 4, timeout=10, what="the DELETE to time out")
        await start_pod(nats_url, "slow-0002", "n1", name="slow", startup_timeout_s=1.0,
                        env={"SAMPLE_STARTUP_DELAY_MS": "30000"})
        await wait_for(lambda: "failed" in w.states("slow-0002"), timeout=10,
                       what="the second slow pod failed by a sweep still running")
        await wait_for(lambda: not pods_named(cluster, "slow-0001")
                       and not pods_named(cluster, "slow-0002"), timeout=15,
                       what="both slow pods deleted")
