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

It is as strict as a kubelet where the backend depends on it:
- It watches the pods of every namespace bound to its nodes. Pods outside its namespace
  (DaemonSets, other tenants — whatever a test adds) run without a process: marked Running,
  deleted at once.
- Admission (`pkg/kubelet/lifecycle/predicate.go`): a newly bound pod is admitted only if its
  requests (the containers' requests, limits where requests are absent, plus `overhead`) fit
  in the Node's allocatable minus the requests of every pod already admitted there and not
  terminal, and the pod count stays within allocatable `pods`; otherwise it is rejected as
  a kubelet does — phase Failed, reason `OutOf<resource>` (the first that does not fit, in
  the scheduler's order: pods, cpu, memory, extended resources), message "Pod was rejected:
  Node didn't have enough resource: ...". Init containers are not counted (ours have none).
- Image pulls (`pulls`): by default instant; an image given a `PullPlan` takes its time
  (waiting `ContainerCreating`), fails with `ErrImagePull` and the registry's message, backs
  off (`ImagePullBackOff`, "Back-off pulling image ...", delays scaled down) and tries again,
  as often as the plan says. `IfNotPresent` pulls an image once per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes.utils.quantity import parse_quantity

from kernel.procs import pdeathsig_preexec
from tests.fakekube import FakeKubernetes, now_rfc3339

USER_AGENT = "kubelet-emulator/0.1"
GPU = "nvidia.com/gpu"


@dataclass
class PullPlan:
    """How pulling one image goes: `delay_s` per attempt, then the next of `errors` (an
    `ErrImagePull` message) until none is left, then success; `forever` repeats the last."""

    delay_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    forever: bool = False
    backoff_s: float = 0.2  # the kubelet's 10 s, doubling up to 5 min, scaled down
    attempts: int = 0


# Messages a registry's failures produce in the kubelet (containerd's wording).
PULL_NOT_FOUND = ('rpc error: code = NotFound desc = failed to pull and unpack image '
                  '"{image}": failed to resolve reference "{image}": {image}: not found')
PULL_DENIED = ('failed to pull and unpack image "{image}": failed to resolve reference '
               '"{image}": pull access denied, repository does not exist or may require '
               'authorization: server message: insufficient_scope: authorization failed')
PULL_RATE_LIMITED = ('failed to pull and unpack image "{image}": failed to copy: '
                     'httpReadSeeker: failed open: unexpected status code '
                     'https://registry.example/v2/{image}/manifests/latest: 429 Too Many '
                     'Requests - Server message: toomanyrequests: You have reached your '
                     'pull rate limit.')


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
        self.pulls: dict[str, PullPlan] = {}  # image → how pulling it goes
        self.pulled: set[tuple[str, str]] = set()  # (node, image)
        self.rejected: list[tuple[str, str]] = []  # (pod, reason), in order
        # What each node's kubelet admitted and still counts: (namespace, name) → (node,
        # requests). Terminal pods leave it.
        self.admitted: dict[tuple[str, str], tuple[str, dict[str, Decimal]]] = {}
        self._pulling: dict[str, asyncio.Task[None]] = {}
        self._refused: set[tuple[str, str]] = set()
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
        for t in self._pulling.values():
            t.cancel()
        await asyncio.gather(*self._pulling.values(), return_exceptions=True)
        for c in list(self.containers.values()):
            for t in c.tasks:
                t.cancel()
            if c.proc.returncode is None:
                c.proc.kill()
                await c.proc.wait()
            await asyncio.gather(*c.tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def run_static(self, node_name: str, name: str, requests: dict[str, str]) -> None:
        """A static pod (from the node's manifest directory) whose mirror pod is not in the
        API — not created yet, or refused: the kubelet counts its requests at admission,
        and nothing watching the API can see them."""
        self.admitted[("", name)] = (node_name, {k: _quantity(k, v)
                                                 for k, v in requests.items()})

    def kill(self, pod: str) -> None:
        """The process dies on its own (OOM, crash)."""
        self.containers[pod].proc.kill()

    # ---- watching ---------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._http is not None
        url = f"{self.api}/api/v1/pods"  # every namespace: admission counts all pods
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
        if not await self._admit(kind, pod):
            return
        if pod["metadata"].get("namespace", self.namespace) != self.namespace:
            await self._on_foreign(kind, pod)
            return
        if name in self._pulling and (kind == "DELETED"
                                      or pod["metadata"].get("deletionTimestamp")):
            self._pulling.pop(name).cancel()
            if kind != "DELETED":
                await self._confirm_deletion(name)
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
        if (c is None and name not in self._pulling
                and pod.get("status", {}).get("phase") == "Pending"):
            image = pod["spec"]["containers"][0].get("image", "")
            if self._must_pull(pod, image):
                self._pulling[name] = asyncio.create_task(self._pull_then_start(pod, image))
            else:
                await self._start(pod)

    # ---- admission (pkg/kubelet/lifecycle/predicate.go) -----------------------------------

    async def _admit(self, kind: str, pod: dict[str, Any]) -> bool:
        """Keep `admitted` current and reject what does not fit; False: the pod was just
        rejected, nothing more to do for it."""
        meta, status = pod["metadata"], pod.get("status") or {}
        key = (meta.get("namespace", ""), meta["name"])
        if kind == "DELETED" or status.get("phase") in ("Failed", "Succeeded"):
            self.admitted.pop(key, None)
            return True
        if key in self._refused:
            return False  # our rejection's own status write is still on its way
        if key in self.admitted or meta.get("deletionTimestamp"):
            return True
        node = pod["spec"]["nodeName"]
        want = pod_requests(pod)
        if status.get("phase") == "Pending":
            why = self._insufficient(node, want)
            if why:
                reason, message = why
                self.rejected.append((meta["name"], reason))
                self._refused.add(key)
                await self._status(meta["name"], {"phase": "Failed", "reason": reason,
                                                  "message": f"Pod was rejected: {message}"},
                                   namespace=key[0])
                return False
        self.admitted[key] = (node, want)
        return True

    def _insufficient(self, node: str, want: dict[str, Decimal]) -> tuple[str, str] | None:
        """The first resource the pod does not fit in, as the scheduler's `Fits` orders
        them (what the kubelet's admission runs), or None."""
        alloc = {k: _quantity(k, v) for k, v in (
            (self.fake.get("", "nodes", node).get("status") or {}).get("allocatable")
            or {}).items()}
        on_node = [req for n, req in self.admitted.values() if n == node]
        allowed = int(alloc.get("pods", 110))
        if len(on_node) + 1 > allowed:
            return "OutOfpods", (f"Node didn't have enough resource: pods, requested: 1, "
                                 f"used: {len(on_node)}, capacity: {allowed}")
        for res in ("cpu", "memory", *sorted(set(want) - {"cpu", "memory"})):
            need = want.get(res, Decimal(0))
            if need <= 0:
                continue
            used = sum((r.get(res, Decimal(0)) for r in on_node), Decimal(0))
            cap = alloc.get(res, Decimal(0))
            if need > cap - used:
                return f"OutOf{res}", (f"Node didn't have enough resource: {res}, requested: "
                                       f"{_show(res, need)}, used: {_show(res, used)}, "
                                       f"capacity: {_show(res, cap)}")
        return None

    async def _on_foreign(self, kind: str, pod: dict[str, Any]) -> None:
        """A pod of another namespace: no process of ours; it runs as soon as it is admitted
        and goes at once when deleted."""
        meta = pod["metadata"]
        if kind == "DELETED":
            return
        if meta.get("deletionTimestamp"):
            await self._confirm_deletion(meta["name"], namespace=meta["namespace"])
        elif (pod.get("status") or {}).get("phase") == "Pending":
            await self._status(meta["name"], {
                "phase": "Running", "podIP": "127.0.0.1", "startTime": now_rfc3339(),
                "conditions": _conditions(True)}, namespace=meta["namespace"])

    # ---- image pulls ------------------------------------------------------------------------

    def _must_pull(self, pod: dict[str, Any], image: str) -> bool:
        policy = pod["spec"]["containers"][0].get("imagePullPolicy", "IfNotPresent")
        if image not in self.pulls:
            return False
        return policy == "Always" or (pod["spec"]["nodeName"], image) not in self.pulled

    async def _pull_then_start(self, pod: dict[str, Any], image: str) -> None:
        """Pull as the plan says, backing off between failed attempts, then start."""
        name, plan = pod["metadata"]["name"], self.pulls[image]
        cname = pod["spec"]["containers"][0]["name"]
        backoff = plan.backoff_s
        waiting = {"waiting": {"reason": "ContainerCreating"}}
        await self._status(name, {"phase": "Pending", "conditions": _conditions(False),
                                  "containerStatuses": [_cstatus(cname, False, waiting)]})
        while True:
            await asyncio.sleep(plan.delay_s)
            n = plan.attempts
            plan.attempts += 1
            if n >= len(plan.errors) and not (plan.forever and plan.errors):
                break
            message = plan.errors[min(n, len(plan.errors) - 1)].format(image=image)
            await self._status(name, {"containerStatuses": [_cstatus(cname, False, {
                "waiting": {"reason": "ErrImagePull", "message": message}})]})
            await asyncio.sleep(min(0.05, backoff))
            await self._status(name, {"containerStatuses": [_cstatus(cname, False, {
                "waiting": {"reason": "ImagePullBackOff",
                            "message": f'Back-off pulling image "{image}"'}})]})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30 * plan.backoff_s)
        self.pulled.add((pod["spec"]["nodeName"], image))
        self._pulling.pop(name, None)
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

    async def _status(self, name: str, status: dict[str, Any], *,
                      namespace: str = "") -> None:
        assert self._http is not None
        url = f"{self.api}/api/v1/namespaces/{namespace or self.namespace}/pods/{name}/status"
        async with self._http.patch(
            url, data=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            await r.read()

    async def _confirm_deletion(self, name: str, *, namespace: str = "") -> None:
        assert self._http is not None
        url = f"{self.api}/api/v1/namespaces/{namespace or self.namespace}/pods/{name}"
        async with self._http.delete(url, json={"kind": "DeleteOptions", "apiVersion": "v1",
                                                "gracePeriodSeconds": 0}) as r:
            await r.read()


def pod_requests(pod: dict[str, Any]) -> dict[str, Decimal]:
    """What admission counts for a pod: each container's requests (its limits where it has
    no requests, as the API server defaults them), summed, plus the pod's `overhead`."""
    total: dict[str, Decimal] = {}
    spec = pod.get("spec") or {}
    for c in spec.get("containers") or []:
        res = c.get("resources") or {}
        for k, v in {**(res.get("limits") or {}), **(res.get("requests") or {})}.items():
            total[k] = total.get(k, Decimal(0)) + _quantity(k, v)
    for k, v in (spec.get("overhead") or {}).items():
        total[k] = total.get(k, Decimal(0)) + _quantity(k, v)
    return total


def _quantity(res: str, value: object) -> Decimal:
    return Decimal(parse_quantity(value))


def _show(res: str, q: Decimal) -> int:
    """As InsufficientResourceError prints it: cpu in millicores, the rest as integers."""
    return int(q * 1000) if res == "cpu" else int(q)


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
         pods: int = 110) -> dict[str, Any]:
    """A Node object as a kubelet registers it."""
    alloc = {"cpu": cpu, "memory": memory, "pods": str(pods)}
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


def foreign_pod(name: str, node_name: str, *, namespace: str = "kube-system",
                cpu: str = "100m", memory: str = "64Mi", gpu: int = 0,
                phase: str = "Running") -> dict[str, Any]:
    """A pod fnplane did not create (a DaemonSet's, another tenant's), bound to a node."""
    requests = {"cpu": cpu, "memory": memory, **({GPU: str(gpu)} if gpu else {})}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"nodeName": node_name, "containers": [{
                "name": "main", "image": "registry.k8s.io/pause:3.9",
                "resources": {"requests": requests}}]},
            "status": {"phase": phase}}


async def wait_for(pred: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
