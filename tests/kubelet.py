"""A small kubelet for the fake API server: no real cluster (nor container runtime) can run
here, so the pods bound to its nodes run as local processes.

Like a kubelet it watches pods through the API (HTTP, its own user agent), starts the
container's command with the container's env — `HOST=127.0.0.1` instead of `0.0.0.0`, as all
pods share the loopback — writes `status` through the status subresource (podIP 127.0.0.1,
phase, containerStatuses, the Ready condition as the readinessProbe's httpGet answers), and
on a graceful deletion sends SIGTERM, waits out the grace period, then confirms with a
delete at `gracePeriodSeconds=0`. Until a pod's first success it probes every 50 ms, so
tests stay fast; after it, on the probe's `periodSeconds` and thresholds, so readiness can
flip both ways. `node_not_ready` takes a node away (its Ready condition Unknown or False, its
kubelet silent). The captured output is what `pods/log` serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from kernel.procs import pdeathsig_preexec
from tests.fakekube import FakeKubernetes, now_rfc3339

USER_AGENT = "kubelet-emulator/0.1"


class Container:
    def __init__(self, pod: dict[str, Any], proc: asyncio.subprocess.Process) -> None:
        self.name = pod["metadata"]["name"]
        self.pod = pod
        self.proc = proc
        self.ready = False
        self.ever_ready = False
        self.deleting = False
        self.probes = 0  # readiness probes run
        self.tasks: list[asyncio.Task[None]] = []


class KubeletEmulator:
    def __init__(self, fake: FakeKubernetes, api_url: str, nodes: set[str], *, namespace: str,
                 workdir: Path) -> None:
        self.fake = fake
        self.api = api_url.rstrip("/")
        self.nodes = nodes
        self.namespace = namespace
        self.workdir = workdir
        self.containers: dict[str, Container] = {}
        self.started: list[str] = []  # pod names, in start order
        self.down: set[str] = set()  # nodes taken NotReady (node_not_ready)
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KubeletEmulator:
        self._http = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT},
                                           timeout=aiohttp.ClientTimeout(total=None))
        self._task = asyncio.create_task(self._run(), name="kubelet-emulator")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop watching and kill every process (a node going away with its pods)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for c in list(self.containers.values()):
            for t in c.tasks:
                t.cancel()
            if c.proc.returncode is None:
                c.proc.kill()
                await c.proc.wait()
            await asyncio.gather(*c.tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def kill(self, pod: str) -> None:
        """The process dies on its own (OOM, crash)."""
        self.containers[pod].proc.kill()

    # ---- watching ---------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._http is not None
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/pods"
        rv = ""
        while True:
            try:
                if not rv:
                    async with self._http.get(url) as r:
                        body = await r.json()
                    rv = body["metadata"]["resourceVersion"]
                    for pod in body["items"]:
                        await self._on_pod("MODIFIED", pod)
                params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "30"}
                async with self._http.get(url, params=params) as r:
                    async for line in r.content:
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        if ev["type"] == "ERROR":
                            rv = ""
                            break
                        rv = ev["object"]["metadata"]["resourceVersion"]
                        await self._on_pod(ev["type"], ev["object"])
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.1)

    async def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        if pod.get("spec", {}).get("nodeName") not in self.nodes:
            return
        c = self.containers.get(name)
        if kind == "DELETED":
            if c is not None and c.proc.returncode is None:
                c.proc.kill()
            return
        if pod["metadata"].get("deletionTimestamp"):
            if c is None:
                await self._confirm_deletion(name)
            elif not c.deleting:
                c.deleting = True
                c.tasks.append(asyncio.create_task(self._terminate(c)))
            return
        if c is None and pod.get("status", {}).get("phase") == "Pending":
            await self._start(pod)

    # ---- containers -------------------------------------------------------------------------

    async def _start(self, pod: dict[str, Any]) -> None:
        spec = pod["spec"]["containers"][0]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                     f"{os.environ.get('PATH', '')}"}
        env.update({e["name"]: e.get("value", "") for e in spec.get("env") or []})
        env["HOST"] = "127.0.0.1"
        name = pod["metadata"]["name"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec["command"], cwd=str(self.workdir), env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, preexec_fn=pdeathsig_preexec,
            )
        except OSError as exc:
            await self._status(name, {"phase": "Pending", "containerStatuses": [
                _cstatus(spec["name"], False, {"waiting": {"reason": "RunContainerError",
                                                           "message": str(exc)}})]})
            return
        c = self.containers[name] = Container(pod, proc)
        self.started.append(name)
        self.fake.logs[(self.namespace, name)] = ""
        await self._status(name, {
            "phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
            "startTime": now_rfc3339(),
            "conditions": _conditions(False),
            "containerStatuses": [_cstatus(spec["name"], False,
                                           {"running": {"startedAt": now_rfc3339()}})],
        })
        c.tasks = [asyncio.create_task(self._pump(c)), asyncio.create_task(self._probe(c)),
                   asyncio.create_task(self._reap(c))]

    async def _pump(self, c: Container) -> None:
        assert c.proc.stdout is not None
        key = (self.namespace, c.name)
        while line := await c.proc.stdout.readline():
            self.fake.logs[key] = self.fake.logs.get(key, "") + line.decode(errors="replace")

    async def _probe(self, c: Container) -> None:
        """Until the first success every 50 ms (Knative-fast, so tests stay fast); then as
        a kubelet does: every `periodSeconds`, Ready=False after `failureThreshold` failures
        in a row, Ready=True again after `successThreshold` successes. Nothing while the
        node is down: a kubelet that is gone updates nothing."""
        assert self._http is not None
        spec = c.pod["spec"]["containers"][0]
        probe = spec["readinessProbe"]
        get = probe["httpGet"]
        url = f"http://127.0.0.1:{get['port']}{get['path']}"
        period = float(probe.get("periodSeconds", 10))
        failures_to_fail = int(probe.get("failureThreshold", 3))
        successes_to_pass = int(probe.get("successThreshold", 1))
        failures = successes = 0
        while c.proc.returncode is None and not c.deleting:
            if self._node_of(c) in self.down:
                await asyncio.sleep(0.05)
                continue
            ok = False
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    ok = 200 <= r.status < 400  # the kubelet's httpGet success
            failures, successes = (0, successes + 1) if ok else (failures + 1, 0)
            if ok and not c.ready and successes >= successes_to_pass:
                await self._set_ready(c, True)
            elif not ok and c.ready and failures >= failures_to_fail:
                await self._set_ready(c, False)
            c.probes += 1
            await asyncio.sleep(period if c.ever_ready else 0.05)

    async def _set_ready(self, c: Container, ready: bool) -> None:
        if self._node_of(c) in self.down or c.deleting or c.proc.returncode is not None:
            return  # a kubelet that is gone (or a container that ended) reports no flip
        c.ready = ready
        c.ever_ready = c.ever_ready or ready
        name = c.pod["spec"]["containers"][0]["name"]
        await self._status(c.name, {
            "conditions": _conditions(ready),
            "containerStatuses": [_cstatus(name, ready, {
                "running": {"startedAt": now_rfc3339()}})],
        })

    def _node_of(self, c: Container) -> str:
        return str(c.pod["spec"].get("nodeName", ""))

    # ---- nodes ------------------------------------------------------------------------------

    async def node_not_ready(self, node_name: str, *, status: str = "Unknown") -> None:
        """The node goes away (a spot GPU reclaimed, a kubelet partitioned): its kubelet stops
        probing and reporting, and the node's Ready condition becomes `status` — Unknown is
        what the node lifecycle controller writes when heartbeats stop, False what a kubelet
        that is up but unhealthy writes. Its processes keep running (as behind a partition),
        so a request that still reaches them would be answered: only routing can tell.
        Not emulated: the node lifecycle controller's later MarkPodsNotReady and NoExecute
        eviction, so the backend must act on the node's condition alone."""
        self.down.add(node_name)
        await self._node_ready_condition(node_name, status, "NodeStatusUnknown"
                                         if status == "Unknown" else "KubeletNotReady")

    async def node_ready(self, node_name: str) -> None:
        """The node is back: Ready=True, and its kubelet probes its pods again."""
        await self._node_ready_condition(node_name, "True", "KubeletReady")
        self.down.discard(node_name)

    async def _node_ready_condition(self, node_name: str, status: str, reason: str) -> None:
        assert self._http is not None
        url = f"{self.api}/api/v1/nodes/{node_name}/status"
        async with self._http.get(f"{self.api}/api/v1/nodes/{node_name}") as r:
            obj = await r.json()
        conditions = [c for c in (obj.get("status") or {}).get("conditions") or []
                      if c.get("type") != "Ready"]
        conditions.append({"type": "Ready", "status": status, "reason": reason,
                           "lastHeartbeatTime": now_rfc3339(),
                           "lastTransitionTime": now_rfc3339()})
        async with self._http.patch(
            url, data=json.dumps({"status": {"conditions": conditions}}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            await r.read()

    async def _reap(self, c: Container) -> None:
        code = await c.proc.wait()
        await asyncio.sleep(0.05)  # the output pump takes the last lines
        if c.deleting:
            return
        spec = c.pod["spec"]["containers"][0]
        await self._status(c.name, {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": _conditions(False),
            "containerStatuses": [_cstatus(spec["name"], False, {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "finishedAt": now_rfc3339()}})],
        })

    async def _terminate(self, c: Container) -> None:
        grace = float(c.pod["spec"].get("terminationGracePeriodSeconds", 30))
        if c.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(c.proc.wait(), timeout=grace)
            except TimeoutError:
                c.proc.kill()
                await c.proc.wait()
        await self._confirm_deletion(c.name)
        self.containers.pop(c.name, None)

    # ---- API writes -------------------------------------------------------------------------

    async def _status(self, name: str, status: dict[str, Any]) -> None:
        assert self._http is not None
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/pods/{name}/status"
        async with self._http.patch(
            url, data=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            await r.read()

    async def _confirm_deletion(self, name: str) -> None:
        assert self._http is not None
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/pods/{name}"
        async with self._http.delete(url, json={"kind": "DeleteOptions", "apiVersion": "v1",
                                                "gracePeriodSeconds": 0}) as r:
            await r.read()


def _conditions(ready: bool) -> list[dict[str, Any]]:
    t = now_rfc3339()
    flag = "True" if ready else "False"
    return [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": t},
            {"type": "Ready", "status": flag, "lastTransitionTime": t}]


def _cstatus(name: str, ready: bool, state: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ready": ready, "restartCount": 0, "image": "fnplane",
            "imageID": "", "started": "running" in state, "state": state}


def node(name: str, *, cpu: str = "4", memory: str = "8Gi", gpu: int = 0,
         labels: dict[str, str] | None = None, models: str = "", ready: bool = True,
         unschedulable: bool = False, taints: list[dict[str, str]] | None = None,
         ) -> dict[str, Any]:
    """A Node object as a kubelet registers it."""
    alloc = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpu:
        alloc["nvidia.com/gpu"] = str(gpu)
    obj: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                              **(labels or {})},
                     "annotations": {"fnplane.dev/models": models} if models else {}},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {"allocatable": alloc, "capacity": dict(alloc), "conditions": [
            {"type": "Ready", "status": "True" if ready else "False",
             "lastHeartbeatTime": now_rfc3339()}]},
    }
    if taints:
        obj["spec"]["taints"] = taints
    return obj


async def wait_for(pred: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
