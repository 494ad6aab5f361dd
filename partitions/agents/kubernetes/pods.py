"""The pods of the `kubernetes` node backend: from StartPod to a bound Pod, and from what the
Pod watch sees to PodEvents (`starting` → `ready` | `failed`, `terminating` → `stopped`), with
the same meaning as the `local` backend's. Pods this run did not create — a restarted control
plane's — are adopted: reported as they are, not started again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from msgspec.structs import replace

from kernel.errors import ErrorCode, RemoteError
from kernel.messages import PodAllocation, PodTimeline, Resources, StartPod
from partitions.agents.kubernetes import objects as ko
from partitions.agents.kubernetes.storage import with_storage_initializer
from partitions.kubeapi import KubeApi, api_reason

log = logging.getLogger(__name__)


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

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}" if self.ip else ""

    @property
    def alive(self) -> bool:
        return self.state not in ("stopped", "failed")


Emit = Callable[..., Awaitable[None]]  # (pod, state, *, reason="", log_tail="")


class PodTracker:
    def __init__(self, api: KubeApi, emit: Emit, *, image: str, image_pull_policy: str,
                 stop_grace_s: int, run_as: tuple[int, int] = (10001, 10001)) -> None:
        self.api = api
        self.emit = emit
        self.image = image
        self.image_pull_policy = image_pull_policy
        self.stop_grace_s = stop_grace_s
        self.pods: dict[str, KubePod] = {}
        self.adopted = 0
        self.run_as = run_as  # (uid, gid) of pods whose service names none

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
        try:
            await self.api.create_pod(manifest)
        except ApiException as exc:
            if exc.status != 409:  # 409: it exists, a retry whose first reply was lost
                self.pods.pop(msg.pod, None)
                raise RemoteError(_code(exc), f"cannot create pod: {api_reason(exc)}") from None
        try:
            await self.api.bind(msg.pod, k8s_node)
        except ApiException as exc:
            if exc.status == 409 and await self._bound_to(msg.pod, k8s_node):
                pass  # bound already, to this node: a retry whose first reply was lost
            else:
                await self._unbound(msg.pod, k8s_node, exc)
        pod.timeline = replace(pod.timeline, spawned_at=time.time())
        pod.state = "starting"
        await self.emit(pod, "starting")
        if pod.pending is not None:
            obj, pod.pending = pod.pending, None
            await self.on_pod("MODIFIED", obj)

    async def _bound_to(self, name: str, k8s_node: str) -> bool:
        """Whether the Pod is bound to this node (the bind is idempotent, as the API's own
        409 'already assigned' is for a second binder, not for the same binding again)."""
        try:
            obj = await self.api.read_pod(name)
        except ApiException:
            return False
        return obj is not None and (obj.get("spec") or {}).get("nodeName") == k8s_node

    async def _unbound(self, name: str, k8s_node: str, exc: ApiException) -> None:
        """The bind failed for good: the Pod is ours and unbound (or bound elsewhere by
        someone else), so it goes, and the StartPod is answered with the reason."""
        self.pods.pop(name, None)
        await self.api.delete_pod(name, grace_s=0)
        raise RemoteError(_code(exc), f"cannot bind pod to {k8s_node}: "
                                      f"{api_reason(exc)}") from None

    async def stop(self, name: str, reason: str) -> None:
        pod = self.pods.get(name)
        if pod is None or pod.state in ("terminating", "stopped", "failed"):
            return
        pod.state, pod.reason = "terminating", reason
        await self.emit(pod, "terminating", reason=reason)
        if not await self.api.delete_pod(name, grace_s=self.stop_grace_s):
            self.pods.pop(name, None)
            pod.state = "stopped"
            await self.emit(pod, "stopped", reason=reason)

    # ---- what the watch sees ---------------------------------------------------------------

    async def on_list(self, items: list[dict[str, Any]]) -> None:
        """A whole list (the first, or after 410 Gone): what we track and is not there any
        more was deleted while we were not watching."""
        names = {p["metadata"]["name"] for p in items}
        for name, pod in list(self.pods.items()):
            if name not in names and pod.state != "creating":
                await self.on_pod("DELETED", {"metadata": {"name": name}})
        for obj in items:
            await self.on_pod("MODIFIED", obj)

    async def on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
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
        if pod.state not in ("starting", "ready"):
            return
        seen = ko.observe_pod(obj)
        if seen.terminating:
            pod.state, pod.reason = "terminating", pod.reason or "pod deleted"
            await self.emit(pod, "terminating", reason=pod.reason)
        elif seen.failed:
            await self.fail(pod, seen.failed)
        elif seen.ready and pod.state == "starting":
            pod.state, pod.ip = "ready", seen.ip
            pod.timeline = replace(pod.timeline, ready_at=time.time())
            await self.emit(pod, "ready")

    async def _adopt(self, obj: dict[str, Any]) -> None:
        """A managed pod this run did not create: report it as it is, or clean it up."""
        seen, rec = ko.observe_pod(obj), ko.pod_record(obj)
        if not seen.k8s_node or seen.failed or not rec.service:
            # Never bound (its creator died between create and bind), or already over.
            log.info("kubernetes: deleting leftover pod %s (%s)", seen.name,
                     seen.failed or "never bound")
            await self.api.delete_pod(seen.name, grace_s=0)
            return
        node = ko.fnplane_node_name(seen.k8s_node)
        pod = KubePod(seen.name, rec.service, node, rec.port, rec.container_concurrency,
                      rec.resources, rec.timeline, rec.startup_timeout_s, ip=seen.ip)
        self.pods[seen.name] = pod
        self.adopted += 1
        if seen.terminating:
            pod.state, pod.reason = "terminating", "pod deleted"
            return
        pod.state = "ready" if seen.ready else "starting"
        log.info("kubernetes: adopted pod %s of %s on %s (%s)", pod.name, pod.service, node,
                 pod.state)
        await self.emit(pod, pod.state)

    # ---- failures ---------------------------------------------------------------------------

    async def sweep(self, now: float) -> None:
        """Pods not ready within their startup timeout are failed (and deleted)."""
        for pod in list(self.pods.values()):
            if (pod.state == "starting"
                    and now > pod.timeline.spawned_at + pod.startup_timeout_s):
                await self.fail(pod, f"not ready within {pod.startup_timeout_s:g}s")

    async def fail(self, pod: KubePod, reason: str) -> None:
        if not pod.alive:
            return
        pod.state = "failed"
        tail = await self.api.log_tail(pod.name, ko.CONTAINER)
        await self.emit(pod, "failed", reason=reason, log_tail=tail)
        await self.api.delete_pod(pod.name, grace_s=0)


def _code(exc: ApiException) -> ErrorCode:
    """API status → an error code the caller can act on (a Pod name taken is a conflict,
    never a stale epoch: `schedule` refreshes its map only on the latter)."""
    return {400: ErrorCode.INVALID, 404: ErrorCode.NOT_FOUND, 409: ErrorCode.CONFLICT,
            422: ErrorCode.INVALID}.get(exc.status or 0, ErrorCode.UNAVAILABLE)


def _first(value: int | None, default: int) -> int:
    return default if value is None else value
