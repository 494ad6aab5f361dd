"""A minimal Deployment controller for the fake API server (tests/fakekube.py): no real
cluster can run here, and the fake stores Deployments without acting on them.

Inside the fake's process, every few ms, for each Deployment of its namespace — what the
Deployment and ReplicaSet controllers and the kubelet do, in small:

- keeps `spec.replicas` active pods (not terminating, not Failed/Succeeded) matching the
  selector: creates missing ones from the pod template (`{deployment}-{hash}-{5 chars}`,
  `pod-template-hash` label, bound to one node, Pending), deletes surplus ones gracefully —
  Pending ones first, then the newest, as the ReplicaSet controller ranks them;
- acts as the kubelet: a Pending pod becomes Running with its container running (after
  `runner.start(pod name)` when a runner is given: the tests run a real `schedule` instance
  per pod), and a terminating pod is stopped (`runner.stop`) and deleted;
- writes the Deployment's `status.replicas` and `readyReplicas`.

`paused` stops it all (pods that go away are then not replaced).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import uuid
from typing import Any, Protocol

from tests.fakekube import FakeKubernetes, now_rfc3339

NODE = "node-1"


class Runner(Protocol):
    async def start(self, pod: str) -> None: ...
    async def stop(self, pod: str) -> None: ...


class DeploymentController:
    def __init__(self, fake: FakeKubernetes, namespace: str, *, runner: Runner | None = None,
                 tick_s: float = 0.02) -> None:
        self.fake = fake
        self.namespace = namespace
        self.runner = runner
        self.tick_s = tick_s
        self.paused = False
        self.created: list[str] = []  # pod names, in creation order
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DeploymentController:
        self._task = asyncio.create_task(self._run(), name="deployment-controller")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.runner is not None:
            for pod in self.pods():
                await self.runner.stop(pod["metadata"]["name"])

    def pods(self, deployment: str = "") -> list[dict[str, Any]]:
        """Pods of the namespace (of one Deployment, when named), oldest first."""
        dep = self.fake.get("apps", "deployments", deployment, self.namespace)
        want = ((dep.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        pods = [p for p in self.fake.objects("", "pods")
                if p["metadata"].get("namespace") == self.namespace
                and (not deployment or _matches(p, want))]
        order = {name: n for n, name in enumerate(self.created)}
        return sorted(pods, key=lambda p: order.get(p["metadata"]["name"], -1))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if self.paused:
                continue
            for dep in self.fake.objects("apps", "deployments"):
                if dep["metadata"].get("namespace") == self.namespace:
                    await self._reconcile(dep)

    async def _reconcile(self, dep: dict[str, Any]) -> None:
        name = dep["metadata"]["name"]
        pods = self.pods(name)
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                await self._kubelet_delete(pod)
            elif pod["status"].get("phase") == "Pending":
                await self._kubelet_run(pod)
        active = [p for p in self.pods(name) if not p["metadata"].get("deletionTimestamp")
                  and p["status"].get("phase") not in ("Failed", "Succeeded")]
        want = dep["spec"].get("replicas", 1)
        for _ in range(want - len(active)):
            self._create(dep)
        if len(active) > want:
            # Pending first, then the newest: a cheap stand-in for the controller's ranking.
            ranked = sorted(active, key=lambda p: (p["status"].get("phase") != "Pending",
                                                   -self.created.index(p["metadata"]["name"])
                                                   if p["metadata"]["name"] in self.created
                                                   else 0))
            for pod in ranked[:len(active) - want]:
                pod = copy.deepcopy(pod)
                pod["metadata"]["deletionTimestamp"] = now_rfc3339(30)
                self._write(pod, "MODIFIED")
        running = sum(1 for p in active if p["status"].get("phase") == "Running")
        status = {"replicas": len(active), "readyReplicas": running,
                  "observedGeneration": dep["metadata"].get("generation", 1)}
        if dep.get("status") != status:
            dep = copy.deepcopy(dep)
            dep["status"] = status
            self.fake._write(("apps", "deployments", self.namespace, name), dep, "MODIFIED")

    def _create(self, dep: dict[str, Any]) -> None:
        template = copy.deepcopy(dep["spec"]["template"])
        digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{dep['metadata']['name']}-{digest}-{uuid.uuid4().hex[:5]}"
        meta = template.get("metadata") or {}
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": self.namespace,
                "labels": {**(meta.get("labels") or {}), "pod-template-hash": digest},
                "uid": str(uuid.uuid4()), "creationTimestamp": now_rfc3339(),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": f"{dep['metadata']['name']}-{digest}",
                                     "uid": dep["metadata"].get("uid", ""),
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {**template["spec"], "nodeName": NODE},
            "status": {"phase": "Pending", "qosClass": "Burstable"},
        }
        self.created.append(name)
        self._write(pod, "ADDED")

    async def _kubelet_run(self, pod: dict[str, Any]) -> None:
        if self.runner is not None:
            await self.runner.start(pod["metadata"]["name"])
        pod = copy.deepcopy(pod)
        t = now_rfc3339()
        pod["status"] = {
            "phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": t,
            "conditions": [{"type": c, "status": "True", "lastTransitionTime": t}
                           for c in ("PodScheduled", "Initialized", "ContainersReady",
                                     "Ready")],
            "containerStatuses": [
                {"name": c["name"], "ready": True, "restartCount": 0, "image": c["image"],
                 "imageID": "", "started": True, "state": {"running": {"startedAt": t}}}
                for c in pod["spec"]["containers"]],
        }
        self._write(pod, "MODIFIED")

    async def _kubelet_delete(self, pod: dict[str, Any]) -> None:
        if self.runner is not None:
            await self.runner.stop(pod["metadata"]["name"])
        self._write(pod, "DELETED")

    def _write(self, pod: dict[str, Any], kind: str) -> None:
        self.fake._write(("", "pods", self.namespace, pod["metadata"]["name"]), pod, kind)


def _matches(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    have = obj["metadata"].get("labels") or {}
    return bool(labels) and all(have.get(k) == v for k, v in labels.items())
