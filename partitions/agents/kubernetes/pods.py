"""The pods of the `kubernetes` node backend: from StartPod to a bound Pod, and from what the
Pod watch sees to PodEvents (`starting` → `ready` | `failed`, `terminating` → `stopped`), with
the same meaning as the `local` backend's. Pods this run did not create — a restarted control
plane's — are adopted: reported as they are, not started again.

Two deadlines: while the kubelet pulls the image (waiting `ContainerCreating`, `ErrImagePull`,
`ImagePullBackOff`) the pull deadline runs from the bind — multi-GB inference images take
minutes, a rate-limited registry (429) makes the kubelet back off and try again — and only a
pull error that no retry can fix (not found, denied: objects.py) fails the pod before it; once
the container runs, the service's startup timeout runs from then.

The API may not answer. A create or bind that timed out (or got a 500/504) may have been
applied: it is retried within the StartPod's budget (a retried create answers 409 if the
first one created; a retried bind is settled by what the watch shows), and a pod whose fate is
still unknown then is abandoned — StartPod fails, so `schedule` releases its room, and the pod
is deleted if it ever shows up. A DELETE the API did not accept is retried by the sweep until
it is accepted or the pod is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.client.exceptions import ApiException
from msgspec.structs import replace

from kernel.errors import ErrorCode, RemoteError
from kernel.messages import PodAllocation, PodTimeline, Resources, StartPod
from partitions.agents.kubernetes import capacity as kc
from partitions.agents.kubernetes import objects as ko
from partitions.agents.kubernetes.storage import with_storage_initializer
from partitions.kubeapi import (
    ApiUnreachable,
    KubeApi,
    api_reason,
    retry_after,
    transient,
    uncertain,
)

log = logging.getLogger(__name__)

ABANDONED_KEEP_S = 600.0  # how long an abandoned pod's name is remembered, to delete it
DELETE_RETRY_MAX_S = 10.0
Deleted = Literal["accepted", "gone", "failed"]


@dataclass
class KubePod:
    """One pod as the backend reports it; `state` is a PodEvent state, or `creating` while
    the Pod is being created and bound."""

    name: str
    service: str
    node: str  # fnplane node name
    port: int
    container_concurrency: int
    resources: Resources
    timeline: PodTimeline
    startup_timeout_s: float
    state: str = "creating"
    ip: str = ""
    reason: str = ""
    pending: dict[str, Any] | None = None  # the newest object seen while still `creating`
    probe_ready: bool = False  # the Pod's own Ready condition, as last seen
    pulling: bool = False  # the kubelet said it is pulling the image (or failed to)
    running_at: float = 0.0  # when the container was first seen running (our clock)
    pull_error: str = ""  # the kubelet's last ErrImagePull message

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}" if self.ip else ""

    @property
    def alive(self) -> bool:
        return self.state not in ("stopped", "failed")


Emit = Callable[..., Awaitable[None]]  # (pod, state, *, reason="", log_tail="")


class PodTracker:
    def __init__(self, api: KubeApi, emit: Emit, *, image: str, image_pull_policy: str,
                 stop_grace_s: int, run_as: tuple[int, int] = (10001, 10001),
                 pull_timeout_s: float = 900.0, start_timeout_s: float = 4.0) -> None:
        self.api = api
        self.emit = emit
        self.image = image
        self.image_pull_policy = image_pull_policy
        self.stop_grace_s = stop_grace_s
        self.pull_timeout_s = pull_timeout_s
        self.start_timeout_s = start_timeout_s  # a StartPod's budget for create and bind
        self.pods: dict[str, KubePod] = {}
        self.adopted = 0
        self.run_as = run_as  # (uid, gid) of pods whose service names none
        # fnplane node → why it is not Ready (NotReady, Unknown, deleted); absent when Ready.
        self.nodes_down: dict[str, str] = {}
        # DELETEs the API has not accepted yet: name → (grace, next try, backoff).
        self.deleting: dict[str, tuple[int, float, float]] = {}
        # Pods given up while their create or bind was uncertain: name → forget after.
        self.abandoned: dict[str, float] = {}

    def allocations(self, nodes: set[str]) -> dict[str, list[PodAllocation]]:
        out: dict[str, list[PodAllocation]] = {n: [] for n in sorted(nodes)}
        for p in self.pods.values():
            if p.node in nodes and p.alive:
                out[p.node].append(
                    PodAllocation(pod=p.name, service=p.service, resources=p.resources)
                )
        return out

    # ---- StartPod / StopPod --------------------------------------------------------------

    async def start(self, msg: StartPod, k8s_node: str, port: int) -> None:
        """Create the Pod, then bind it to the node; raises RemoteError when the API refuses."""
        if msg.pod in self.pods:
            return  # a retried StartPod
        spec = msg.spec
        pod = self.pods[msg.pod] = KubePod(
            msg.pod,
            spec.name,
            msg.node,
            port,
            spec.container_concurrency,
            spec.resources,
            PodTimeline(requested_at=msg.requested_at, placed_at=msg.placed_at),
            spec.startup_timeout_s,
        )
        # The service's own image, else the backend's (which carries the sample model).
        image = spec.image or self.image
        manifest = ko.pod_manifest(msg, namespace=self.api.namespace, image=image,
                                   port=port, image_pull_policy=self.image_pull_policy,
                                   grace_s=self.stop_grace_s,
                                   run_as_user=_first(spec.run_as_user, self.run_as[0]),
                                   run_as_group=_first(spec.run_as_group, self.run_as[1]))
        # A storageUri: KServe's storage-initializer init container, run from fnplane's image.
        manifest = with_storage_initializer(manifest, spec, image=self.image)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            await self._create(pod, manifest, deadline)
            await self._bind(pod, k8s_node, deadline)
        except RemoteError:
            raise
        except Exception as exc:  # never a pod left `creating`: whatever it is, it goes
            log.exception("kubernetes: starting pod %s", pod.name)
            self.abandon(pod.name)
            raise RemoteError(ErrorCode.INTERNAL, f"cannot start pod: {exc}") from None
        pod.timeline = replace(pod.timeline, spawned_at=time.time())
        pod.state = "starting"
        await self.emit(pod, "starting")
        if pod.pending is not None:
            obj, pod.pending = pod.pending, None
            await self.on_pod("MODIFIED", obj)

    async def _bound_by_api(self, name: str, k8s_node: str) -> bool:
        """Whether the Pod is bound to this node, as the API has it now (the bind is
        idempotent: the API's 409 'already assigned' is for a second binder, not for the
        same binding again, which a retry whose first reply was lost, or a second agent
        during a rollout, sends)."""
        try:
            obj = await self.api.read_pod(name)
        except (ApiException, ApiUnreachable):
            return False
        return obj is not None and (obj.get("spec") or {}).get("nodeName") == k8s_node

    async def _create(self, pod: KubePod, manifest: dict[str, Any], deadline: float) -> None:
        """POST the Pod until the API says it exists (201; 409 to a retry whose first try
        was applied) or the watch shows it. Raises RemoteError: at once when the API refuses
        for good; when the budget runs out, after abandoning the pod if a try may have
        created it."""
        backoff, maybe = 0.1, False
        while True:
            left = min(self.api.timeout, max(deadline - time.monotonic(), 0.05))
            try:
                await self.api.create_pod(manifest, timeout_s=left)
                return
            except (ApiException, ApiUnreachable) as exc:
                if isinstance(exc, ApiException) and exc.status == 409:
                    return  # it exists: a try whose answer was lost, or a retried StartPod
                why = api_reason(exc) if isinstance(exc, ApiException) else str(exc)
                if not transient(exc):
                    self.pods.pop(pod.name, None)
                    raise RemoteError(_code(exc), f"cannot create pod: {why}") from None
                maybe = maybe or uncertain(exc)
                wait = retry_after(exc, backoff)
            if pod.pending is not None:
                return  # the watch saw it: created after all
            if time.monotonic() + wait >= deadline:
                if maybe:
                    self.abandon(pod.name)
                else:
                    self.pods.pop(pod.name, None)
                raise RemoteError(ErrorCode.UNAVAILABLE, f"cannot create pod: {why} (given up "
                                  f"after {self.start_timeout_s:g}s)")
            log.info("kubernetes: creating pod %s: %s; again in %.1fs", pod.name, why, wait)
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, 1.0)

    async def _bind(self, pod: KubePod, k8s_node: str, deadline: float) -> None:
        """POST the Binding until it took: 201, or the watch shows the pod on the node (an
        uncertain try that was applied answers 409 when tried again). A pod that cannot be
        bound is abandoned (deleted) and RemoteError raised."""
        backoff, maybe = 0.1, False
        while True:
            left = min(self.api.timeout, max(deadline - time.monotonic(), 0.05))
            try:
                await self.api.bind(pod.name, k8s_node, timeout_s=left)
                return
            except (ApiException, ApiUnreachable) as exc:
                why = api_reason(exc) if isinstance(exc, ApiException) else str(exc)
                code = _code(exc) if isinstance(exc, ApiException) else ErrorCode.UNAVAILABLE
                if self._bound_to(pod) == k8s_node or (
                        isinstance(exc, ApiException) and exc.status == 409
                        and await self._bound_by_api(pod.name, k8s_node)):
                    return
                settling = maybe and isinstance(exc, ApiException) and exc.status == 409
                if not transient(exc) and not settling:
                    self.abandon(pod.name)
                    raise RemoteError(code, f"cannot bind pod to {k8s_node}: {why}") from None
                maybe = maybe or uncertain(exc)
                wait = retry_after(exc, backoff)
            if time.monotonic() + wait >= deadline:
                self.abandon(pod.name)
                raise RemoteError(ErrorCode.UNAVAILABLE, f"cannot bind pod to {k8s_node}: "
                                  f"{why} (given up after {self.start_timeout_s:g}s)")
            log.info("kubernetes: binding pod %s: %s; again in %.1fs", pod.name, why, wait)
            await asyncio.sleep(wait)
            if self._bound_to(pod) == k8s_node:
                return
            backoff = min(backoff * 2, 1.0)

    @staticmethod
    def _bound_to(pod: KubePod) -> str:
        return ((pod.pending or {}).get("spec") or {}).get("nodeName") or ""

    def abandon(self, name: str) -> None:
        """Forget a pod whose StartPod fails; delete it, now or whenever it shows up."""
        self.pods.pop(name, None)
        self.abandoned[name] = time.time() + ABANDONED_KEEP_S
        self.deleting.setdefault(name, (0, 0.0, 0.5))

    async def _delete(self, name: str, grace_s: int) -> Deleted:
        """DELETE, remembered for the sweep to try again when the API did not accept it."""
        try:
            accepted = await self.api.remove_pod(name, grace_s=grace_s)
        except (ApiException, ApiUnreachable) as exc:
            why = api_reason(exc) if isinstance(exc, ApiException) else str(exc)
            _, _, backoff = self.deleting.get(name, (grace_s, 0.0, 0.25))
            backoff = min(backoff * 2, DELETE_RETRY_MAX_S)
            self.deleting[name] = (grace_s, time.time() + backoff, backoff)
            log.warning("kubernetes: deleting pod %s: %s; again in %.1fs", name, why, backoff)
            return "failed"
        self.deleting.pop(name, None)
        return "accepted" if accepted else "gone"

    async def stop(self, name: str, reason: str) -> None:
        pod = self.pods.get(name)
        if pod is None or pod.state in ("terminating", "stopped", "failed"):
            return
        pod.state, pod.reason = "terminating", reason
        await self.emit(pod, "terminating", reason=reason)
        if await self._delete(name, self.stop_grace_s) == "gone":
            await self._gone(pod)

    async def _gone(self, pod: KubePod) -> None:
        """The API says the pod does not exist (404 to our DELETE)."""
        self.pods.pop(pod.name, None)
        if pod.alive or pod.state == "terminating":
            pod.state = "stopped"
            await self.emit(pod, "stopped", reason=pod.reason or "pod deleted")

    # ---- what the watch sees ---------------------------------------------------------------

    async def on_list(self, items: list[dict[str, Any]]) -> None:
        """A whole list (the first, or after 410 Gone): what we track and is not there any
        more was deleted while we were not watching."""
        names = {p["metadata"]["name"] for p in items}
        for name in set(self.abandoned) - names:
            self.deleting.pop(name, None)  # nothing to delete (yet)
        for name, pod in list(self.pods.items()):
            if name not in names and pod.state != "creating":
                await self.on_pod("DELETED", {"metadata": {"name": name}})
        for obj in items:
            await self.on_pod("MODIFIED", obj)

    async def on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name in self.abandoned:
            if kind == "DELETED" or obj["metadata"].get("deletionTimestamp"):
                self.deleting.pop(name, None)
            else:  # it was created (and maybe bound) after all: it must go
                self.deleting.setdefault(name, (0, 0.0, 0.5))
            return
        pod = self.pods.get(name)
        if pod is None:
            if kind != "DELETED":
                await self._adopt(obj)
            return
        if kind == "DELETED":
            if pod.state == "creating":
                return  # the start's own calls fail, and it answers with the error
            self.pods.pop(name, None)
            if pod.alive:
                pod.state = "stopped"
                await self.emit(pod, "stopped", reason=pod.reason or "pod deleted")
            return
        if pod.state == "creating":
            pod.pending = obj
            return
        if pod.state not in ("starting", "ready", "unready"):
            return
        seen = ko.observe_pod(obj)
        pod.probe_ready = seen.ready
        self._note_container(pod, obj)
        if seen.terminating:
            pod.state, pod.reason = "terminating", pod.reason or "pod deleted"
            await self.emit(pod, "terminating", reason=pod.reason)
        elif seen.failed and kc.rejection(seen.failed):
            await self.refused(pod, seen.failed)
        elif seen.failed:
            await self.fail(pod, seen.failed)
        elif seen.ready and pod.state == "starting":
            pod.state, pod.ip = "ready", seen.ip
            pod.timeline = replace(pod.timeline, ready_at=time.time())
            await self.emit(pod, "ready")
        elif pod.state in ("ready", "unready"):
            await self._follow_readiness(pod)

    # ---- ready ↔ unready ----------------------------------------------------------------------

    async def node_readiness(self, node: str, down: str) -> None:
        """A node's Ready condition changed (`down`: why it is not Ready, "" when it is).
        Its ready pods stop getting traffic at once: a NotReady node (a spot GPU reclaimed,
        a kubelet gone) answers nobody, and its own kubelet cannot say so any more. The
        node lifecycle controller marks them not Ready too, but only after its grace."""
        if self.nodes_down.get(node, "") == down:
            return
        if down:
            self.nodes_down[node] = down
        else:
            self.nodes_down.pop(node, None)
        for pod in [p for p in self.pods.values() if p.node == node]:
            if pod.state in ("ready", "unready"):
                await self._follow_readiness(pod)

    async def _follow_readiness(self, pod: KubePod) -> None:
        """`ready` while the Pod's Ready condition is True and its node is Ready; else
        `unready`: alive, counted by `scale`, withdrawn by `route`."""
        down = self.nodes_down.get(pod.node, "")
        want = "ready" if pod.probe_ready and not down else "unready"
        if want == pod.state:
            return
        pod.state = want
        why = "" if want == "ready" else down or "readiness probe failing (Ready=False)"
        log.warning("kubernetes: pod %s is %s%s", pod.name, want, f": {why}" if why else "")
        await self.emit(pod, want, reason=why)

    async def _adopt(self, obj: dict[str, Any]) -> None:
        """A managed pod this run did not create: report it as it is, or clean it up."""
        seen, rec = ko.observe_pod(obj), ko.pod_record(obj)
        if not seen.k8s_node or seen.failed or not rec.service:
            # Never bound (its creator died between create and bind), or already over.
            log.info("kubernetes: deleting leftover pod %s (%s)", seen.name,
                     seen.failed or "never bound")
            await self._delete(seen.name, 0)
            return
        node = ko.fnplane_node_name(seen.k8s_node)
        pod = KubePod(seen.name, rec.service, node, rec.port, rec.container_concurrency,
                      rec.resources, rec.timeline, rec.startup_timeout_s, ip=seen.ip,
                      probe_ready=seen.ready)
        self.pods[seen.name] = pod
        self.adopted += 1
        self._note_container(pod, obj)
        if pod.running_at:  # its startup timeout runs from the container's start
            pod.running_at = ko.container_started_at(obj) or pod.running_at
        if seen.terminating:
            pod.state, pod.reason = "terminating", "pod deleted"
            return
        pod.state = "ready" if seen.ready else "starting"
        if pod.state == "ready" and self.nodes_down.get(node):
            pod.state = "unready"  # alive on a NotReady node: no traffic until it is back
        log.info("kubernetes: adopted pod %s of %s on %s (%s)", pod.name, pod.service, node,
                 pod.state)
        await self.emit(pod, pod.state)

    # ---- failures ---------------------------------------------------------------------------

    def _note_container(self, pod: KubePod, obj: dict[str, Any]) -> None:
        """Which deadline runs: the pull's while the kubelet pulls, the startup's once the
        container runs."""
        waiting, message, running = ko.container_state(obj)
        if running and not pod.running_at:
            pod.running_at = time.time()
        if waiting in ko.PULLING:
            pod.pulling = True
        if waiting == "ErrImagePull" and message:
            pod.pull_error = message

    def overdue(self, pod: KubePod, now: float) -> str:
        """Why a starting pod is past its deadline, or ""."""
        if pod.running_at:
            if now > pod.running_at + pod.startup_timeout_s:
                return f"not ready within {pod.startup_timeout_s:g}s"
        elif pod.pulling:
            if now > pod.timeline.spawned_at + self.pull_timeout_s:
                last = f": {pod.pull_error}" if pod.pull_error else ""
                return f"image not pulled within {self.pull_timeout_s:g}s{last}"
        elif now > pod.timeline.spawned_at + pod.startup_timeout_s:
            return f"not ready within {pod.startup_timeout_s:g}s"
        return ""

    async def sweep(self, now: float) -> None:
        """Pods past their pull or startup deadline are failed (and deleted); DELETEs the API
        did not accept are tried again. One pod's trouble does not stop the others'."""
        for pod in list(self.pods.values()):
            if pod.state == "starting" and (why := self.overdue(pod, now)):
                try:
                    await self.fail(pod, why)
                except Exception:
                    log.exception("kubernetes: failing pod %s", pod.name)
        for name, (grace, next_at, _) in list(self.deleting.items()):
            if now >= next_at and await self._delete(name, grace) == "gone":
                pod = self.pods.get(name)
                if pod is not None:
                    await self._gone(pod)
        for name, until in list(self.abandoned.items()):
            if now > until and name not in self.deleting:
                del self.abandoned[name]

    async def refused(self, pod: KubePod, reason: str) -> None:
        """The kubelet's admission turned the pod away for room (OutOfcpu, OutOfpods...).
        Not a failure of the service — it never ran — so it is reported `stopped` with the
        reason: its room is released, `scale` places another without backing off, and the
        requests waiting for it wait for that one. Deleted, as a failed pod."""
        if not pod.alive:
            return
        pod.state, pod.reason = "stopped", reason
        await self.emit(pod, "stopped", reason=reason)
        if await self._delete(pod.name, 0) == "gone":
            self.pods.pop(pod.name, None)

    async def fail(self, pod: KubePod, reason: str) -> None:
        if not pod.alive:
            return
        pod.state = "failed"
        tail = await self.api.log_tail(pod.name, ko.CONTAINER)
        await self.emit(pod, "failed", reason=reason, log_tail=tail)
        if await self._delete(pod.name, 0) == "gone":
            self.pods.pop(pod.name, None)


def _code(exc: ApiException) -> ErrorCode:
    """API status → an error code the caller can act on (a Pod name taken is a conflict,
    never a stale epoch: `schedule` refreshes its map only on the latter)."""
    return {400: ErrorCode.INVALID, 404: ErrorCode.NOT_FOUND, 409: ErrorCode.CONFLICT,
            422: ErrorCode.INVALID}.get(exc.status or 0, ErrorCode.UNAVAILABLE)


def _first(value: int | None, default: int) -> int:
    return default if value is None else value
