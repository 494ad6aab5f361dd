"""The coordinator's Kubernetes instance runtime (controlplane/kube_runtime.py) against a fake
API server on loopback (kmock-based, tests/fakekube.py): no real cluster can run here. The
real `kubernetes` client talks real HTTP to the fake; the `fnplane-schedule` Deployment is
the one deploy/ builds; tests/replicaset.py, a minimal Deployment controller, keeps its pods
(and, for the coordinator test, runs a real `schedule` instance per pod, named after it).
Every API call the runtime makes is checked against the coordinator's Role in deploy/."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock

from controlplane import build as builder
from controlplane import component
from controlplane.kube_runtime import InstanceSet, KubernetesRuntime, pod_is_instance
from functions.schedule.instance import ScheduleInstance
from kernel.config import Config
from tests.deployutil import assert_least_privilege, build
from tests.fakekube import ApiCall, FakeKubernetes, now_rfc3339
from tests.kubelet import wait_for
from tests.kubeutil import NAMESPACE, write_kubeconfig
from tests.replicaset import DeploymentController, Runner

DEPLOYMENT = "fnplane-schedule"
USER_AGENT = "fnplane-coordinator"


def deployment(name: str = DEPLOYMENT) -> dict[str, Any]:
    """The Deployment deploy/ builds (no `replicas`: the fake defaults them to 1)."""
    dep = next(d for d in build("base") if d["kind"] == "Deployment"
               and d["metadata"]["name"] == name)
    return copy.deepcopy(dep)


@dataclass
class Api:
    fake: FakeKubernetes
    kubeconfig: Path
    controller: DeploymentController

    def runtime(self, **overrides: Any) -> KubernetesRuntime:
        opts: dict[str, Any] = dict(kubeconfig=str(self.kubeconfig), watch_timeout_s=5,
                                    request_timeout_s=5, sync_timeout_s=10)
        return KubernetesRuntime(NAMESPACE, {"schedule": DEPLOYMENT}, **{**opts, **overrides})

    def replicas(self) -> int:
        return self.fake.get("apps", "deployments", DEPLOYMENT, NAMESPACE)["spec"]["replicas"]

    def scale_calls(self, verb: str) -> list[ApiCall]:
        return [c for c in self.fake.calls(USER_AGENT)
                if c.resource == "deployments/scale" and c.verb == verb]

    def running(self) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.controller.pods(DEPLOYMENT)
                      if pod_is_instance(p))

    def set_pod(self, name: str, **changes: Any) -> None:
        """Write a pod as the kubelet or another client would (meta/status changes)."""
        pod = copy.deepcopy(self.fake.get("", "pods", name, NAMESPACE))
        pod["metadata"].update(changes.get("metadata", {}))
        pod["status"].update(changes.get("status", {}))
        self.fake._write(("", "pods", NAMESPACE, name), pod, "MODIFIED")


@asynccontextmanager
async def fake_api(tmp_path: Path, *, runner: Runner | None = None) -> AsyncIterator[Api]:
    async with FakeKubernetes() as fake, kmock.Server(fake) as server:
        fake.put("apps", "deployments", deployment())
        fake.put("apps", "deployments", deployment("fnplane-route"))  # not ours to touch
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"),
                                      NAMESPACE)
        async with DeploymentController(fake, NAMESPACE, runner=runner) as controller:
            api = Api(fake, kubeconfig, controller)
            await wait_for(lambda: len(api.running()) == 1, timeout=5, what="the first pod")
            yield api
        # Least privilege, checked not assumed: every call the runtime made is allowed by
        # the coordinator's Role in deploy/.
        assert_least_privilege("coordinator", fake.calls(USER_AGENT))


@asynccontextmanager
async def started(api: Api, **overrides: Any) -> AsyncIterator[tuple[KubernetesRuntime,
                                                                      list[str]]]:
    runtime = api.runtime(**overrides)
    exits: list[str] = []
    runtime.on_exit = lambda kind, instance: exits.append(f"{kind}/{instance}")
    await runtime.start()
    try:
        yield runtime, exits
    finally:
        await runtime.stop()


async def test_scale_patches_the_scale_subresource_only_when_the_replicas_differ(
    tmp_path: Path
) -> None:
    """scale(n) reads deployments/fnplane-schedule/scale and patches it (a merge patch of
    spec.replicas) when n differs; the Deployment's pods become the instances, named by
    pod; the other Deployment is never touched."""
    async with fake_api(tmp_path) as api, started(api) as (runtime, _):
        assert runtime.instances("schedule") == api.running()
        await runtime.scale("schedule", 3)
        assert api.replicas() == 3
        await wait_for(lambda: runtime.instances("schedule") == api.running()
                       and len(api.running()) == 3, timeout=5, what="three instances")
        await runtime.scale("schedule", 3)
        assert len(api.scale_calls("patch")) == 1

        await runtime.scale("schedule", 1)
        await wait_for(lambda: len(runtime.instances("schedule")) == 1, timeout=5,
                       what="one instance")
        assert runtime.instances("schedule") == api.running()
        assert api.replicas() == 1
        patches = api.scale_calls("patch")
        assert [(c.name, c.namespace, c.group) for c in patches] == [
            (DEPLOYMENT, NAMESPACE, "apps")] * 2
        sent = [r for r in api.fake if str(r.method.value).upper() == "PATCH"]
        assert {str(r.headers.get("Content-Type")) for r in sent} == {
            "application/merge-patch+json"}
        assert [r.data for r in sent] == [{"spec": {"replicas": 3}}, {"spec": {"replicas": 1}}]
        assert api.fake.get("apps", "deployments", "fnplane-route", NAMESPACE)["spec"][
            "replicas"] == 1


async def test_instances_are_the_running_non_terminating_pods_of_the_deployment(
    tmp_path: Path
) -> None:
    """Pending, terminating, failed and crash-looping pods are not instances, nor are pods
    outside the Deployment's selector."""
    async with fake_api(tmp_path) as api:
        api.controller.paused = True
        (first,) = api.running()
        labels = api.fake.get("", "pods", first, NAMESPACE)["metadata"]["labels"]
        template = api.fake.get("", "pods", first, NAMESPACE)
        for name, status, meta in (
            ("pending", {"phase": "Pending"}, {}),
            ("running", {}, {}),
            ("terminating", {}, {"deletionTimestamp": now_rfc3339(30)}),
            ("failed", {"phase": "Failed", "reason": "Evicted"}, {}),
            ("crashloop", {"containerStatuses": [{"name": "schedule", "restartCount": 3,
                                                  "state": {"waiting": {
                                                      "reason": "CrashLoopBackOff"}}}]}, {}),
            ("other", {}, {"labels": {"app.kubernetes.io/name": "fnplane-route"}}),
        ):
            pod = copy.deepcopy(template)
            pod["metadata"].update({"name": f"fnplane-schedule-x-{name}",
                                    "labels": dict(labels), **meta})
            pod["status"].update(status)
            api.fake.put("", "pods", pod)
        async with started(api) as (runtime, _):
            assert runtime.instances("schedule") == sorted(
                [first, "fnplane-schedule-x-running"])
            assert runtime.instances("route") == []


async def test_kill_deletes_the_pod_reports_it_gone_and_the_deployment_replaces_it(
    tmp_path: Path
) -> None:
    async with fake_api(tmp_path) as api, started(api) as (runtime, exits):
        await runtime.scale("schedule", 2)
        await wait_for(lambda: len(runtime.instances("schedule")) == 2, timeout=5,
                       what="two instances")
        victim = runtime.instances("schedule")[0]
        await runtime.kill("schedule", victim)
        await wait_for(lambda: exits == [f"schedule/{victim}"], timeout=5, what="on_exit")
        await wait_for(lambda: len(runtime.instances("schedule")) == 2, timeout=5,
                       what="the replacement")
        assert victim not in runtime.instances("schedule")
        assert api.fake.get("", "pods", victim, NAMESPACE) == {}
        deletes = [c for c in api.fake.calls(USER_AGENT) if c.verb == "delete"]
        assert [(c.resource, c.name) for c in deletes] == [("pods", victim)]

        # A name that is not a pod of the Deployment is never deleted.
        other = copy.deepcopy(api.fake.get("", "pods", runtime.instances("schedule")[0],
                                           NAMESPACE))
        other["metadata"].update(name="redis-0", labels={"app.kubernetes.io/name": "redis"})
        api.fake.put("", "pods", other)
        await runtime.kill("schedule", "redis-0")
        assert api.fake.get("", "pods", "redis-0", NAMESPACE) != {}
        assert len([c for c in api.fake.calls(USER_AGENT) if c.verb == "delete"]) == 1


async def test_a_pod_that_disappears_fails_or_restarts_fires_on_exit(tmp_path: Path) -> None:
    """Deleted by someone else, failed (evicted), its container restarted by the kubelet
    (the process died, the pod lives on), or deleted while the watch was cut off and the
    history compacted (410 Gone → the re-list shows it missing): each fires on_exit once."""
    async with fake_api(tmp_path) as api, started(api) as (runtime, exits):
        await runtime.scale("schedule", 4)
        await wait_for(lambda: len(runtime.instances("schedule")) == 4, timeout=5,
                       what="four instances")
        api.controller.paused = True
        gone, failed, restarted, unseen = runtime.instances("schedule")

        api.fake._write(("", "pods", NAMESPACE, gone),
                        api.fake.get("", "pods", gone, NAMESPACE), "DELETED")
        api.set_pod(failed, status={"phase": "Failed", "reason": "Evicted"})
        pod = api.fake.get("", "pods", restarted, NAMESPACE)
        cs = copy.deepcopy(pod["status"]["containerStatuses"])
        cs[0]["restartCount"] = 1
        api.set_pod(restarted, status={"containerStatuses": cs})
        await wait_for(lambda: len(exits) == 3, timeout=5, what="three exits")
        assert sorted(exits) == sorted(f"schedule/{p}" for p in (gone, failed, restarted))
        assert runtime.instances("schedule") == sorted([restarted, unseen])

        api.fake.pause_watches()
        api.fake._write(("", "pods", NAMESPACE, unseen),
                        api.fake.get("", "pods", unseen, NAMESPACE), "DELETED")
        api.fake.sever_watches(compact=True)
        await wait_for(lambda: len(exits) == 4, timeout=10, what="the exit seen by re-list")
        assert exits[-1] == f"schedule/{unseen}"
        assert runtime.instances("schedule") == [restarted]
        assert runtime.watches[0].relists >= 1


async def test_stop_scales_nothing_down(tmp_path: Path) -> None:
    """A stopping control plane leaves its instances running."""
    async with fake_api(tmp_path) as api:
        async with started(api) as (runtime, _):
            await runtime.scale("schedule", 2)
            await wait_for(lambda: len(api.running()) == 2, timeout=5, what="two pods")
        assert api.replicas() == 2
        assert len(api.scale_calls("patch")) == 1
        assert len(api.running()) == 2


def test_instance_set_table() -> None:
    """Which watch events end an instance (pure)."""
    def pod(name: str, phase: str = "Running", restarts: int = 0, **meta: Any) -> dict:
        return {"metadata": {"name": name, **meta}, "status": {
            "phase": phase, "containerStatuses": [
                {"restartCount": restarts, "state": {"running": {}}}]}}

    s = InstanceSet()
    assert s.sync([pod("a"), pod("b", phase="Pending")]) == []
    assert s.observe("MODIFIED", pod("b")) == []  # started: joins, no exit
    assert s.observe("MODIFIED", pod("a", restarts=1)) == ["a"]  # restarted: exit, still live
    assert s.observe("MODIFIED", pod("a", restarts=1)) == []
    assert s.observe("MODIFIED", pod("a", deletionTimestamp="t")) == ["a"]
    assert s.observe("DELETED", pod("a", deletionTimestamp="t")) == []  # reported once
    assert s.sync([]) == ["b"]
    assert sorted(s.live) == [] and s.known == set()


# ---- the coordinator on this runtime ----------------------------------------------------------


class ScheduleInstances:
    """The 'containers' of the `schedule` pods: a real ScheduleInstance per pod, with the pod
    name as its id (as FNPLANE_INSTANCE_ID gives it in the cluster)."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.running: dict[str, ScheduleInstance] = {}

    async def start(self, pod: str) -> None:
        if not pod.startswith(f"{DEPLOYMENT}-"):
            return  # the other Deployment's pods run nothing here
        inst = await builder.schedule(Config(nats_url=self.nats_url), pod)
        await inst.start()
        self.running[pod] = inst

    async def stop(self, pod: str) -> None:
        inst = self.running.pop(pod, None)
        if inst is not None:
            await inst.stop()

    async def crash(self, pod: str) -> None:
        await self.running.pop(pod).crash()


async def test_the_coordinator_scales_schedule_to_its_min_and_reassigns_a_crashed_pods_partition(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The coordinator component as deploy/ runs it (FNPLANE_RUNTIME=kubernetes), with the
    real Coordinator over the real NATS and Redis: at start it patches the scale subresource
    up to its min (2, from the Deployment's 1); each pod's instance owns a partition under
    the pod's name. When a pod's container crashes, the watch reports it and its partition
    loses its owner at once — long before the (here 30 s) heartbeat timeout. Stopping the
    coordinator scales nothing down."""
    runner = ScheduleInstances(nats_url)
    async with fake_api(tmp_path, runner=runner) as api:
        built = await component.build("coordinator", {
            "FNPLANE_NATS_URL": nats_url, "FNPLANE_REDIS_URL": redis_url,
            "FNPLANE_RUNTIME": "kubernetes", "FNPLANE_NAMESPACE": NAMESPACE,
            "FNPLANE_KUBECONFIG": str(api.kubeconfig), "FNPLANE_SCHEDULE_MIN": "2",
            "FNPLANE_SCHEDULE_MAX": "3"})
        assert isinstance(built.runtime, KubernetesRuntime)
        assert built.runtime.deployments == {"schedule": DEPLOYMENT}
        coord = built.coordinator
        # Silence alone would take 30 s to notice: a faster reassignment is the watch's.
        coord.config = dataclasses.replace(coord.config, heartbeat_timeout_s=30.0)

        def owners() -> set[str]:
            return {p.owner for p in coord.pmap.partitions if p.owner}

        await built.start()
        try:
            assert [c.name for c in api.scale_calls("patch")] == [DEPLOYMENT]
            assert api.replicas() == 2
            await wait_for(lambda: len(owners()) == 2, timeout=10, what="two owners")
            assert owners() == set(api.running()) == set(built.runtime.instances("schedule"))

            victim = sorted(owners())[0]
            await runner.crash(victim)
            cs = copy.deepcopy(api.fake.get("", "pods", victim, NAMESPACE)["status"][
                "containerStatuses"])
            cs[0]["state"] = {"terminated": {"exitCode": 137, "reason": "Error"}}
            api.controller.paused = True  # the kubelet would restart it: not yet
            api.set_pod(victim, status={"containerStatuses": cs})
            elapsed = await _timed(lambda: victim not in owners(), timeout=5)
            assert elapsed < 3.0
            assert victim not in built.runtime.instances("schedule")
        finally:
            await built.stop()
        assert api.replicas() == 2
        assert len(api.scale_calls("patch")) == 1


async def _timed(pred: Any, *, timeout: float) -> float:
    t0 = time.monotonic()
    await wait_for(pred, timeout=timeout, what="the partition reassigned")
    return time.monotonic() - t0


# ---- wiring and manifests -------------------------------------------------------------------


async def test_the_coordinator_component_uses_the_kubernetes_runtime_only_when_told(
    nats_url: str,
) -> None:
    env = {"FNPLANE_NAMESPACE": NAMESPACE, "FNPLANE_NATS_URL": nats_url}
    plain = await component.build("coordinator", env)
    await plain.stop()
    assert plain.runtime is None
    built = await component.build("coordinator", {**env, "FNPLANE_RUNTIME": "kubernetes"})
    await built.stop()
    assert isinstance(built.runtime, KubernetesRuntime)
    assert built.coordinator.runtime is built.runtime
    assert built.runtime.namespace == NAMESPACE
    try:
        await component.build("coordinator", {**env, "FNPLANE_RUNTIME": "tasks"})
    except SystemExit as exc:
        assert "kubernetes" in str(exc)
    else:
        raise AssertionError("an unknown FNPLANE_RUNTIME was accepted")
    schedule = await component.build("schedule", {
        **env, "FNPLANE_INSTANCE_ID": "fnplane-schedule-abc-x1", "HOSTNAME": "truncated"})
    await schedule.stop()
    assert schedule.id == "fnplane-schedule-abc-x1"


def test_deploy_runs_the_coordinator_with_the_runtime_and_schedule_by_pod_name() -> None:
    docs = {d["metadata"]["name"]: d for d in build("base") if d["kind"] == "Deployment"}

    def env(name: str) -> dict[str, Any]:
        c = docs[name]["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}

    coord = env("fnplane-coordinator")
    assert coord["FNPLANE_RUNTIME"] == "kubernetes"
    assert coord["FNPLANE_SCHEDULE_DEPLOYMENT"] == DEPLOYMENT
    assert coord["FNPLANE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env(DEPLOYMENT)["FNPLANE_INSTANCE_ID"] == {
        "fieldRef": {"fieldPath": "metadata.name"}}
    assert "replicas" not in docs[DEPLOYMENT]["spec"]  # owned by the coordinator
    role = next(d for d in build("base") if d["kind"] == "Role"
                and d["metadata"]["name"] == "fnplane-coordinator")
    scale_rule = next(r for r in role["rules"] if r["resources"] == ["deployments/scale"])
    assert scale_rule["resourceNames"] == [coord["FNPLANE_SCHEDULE_DEPLOYMENT"]]
