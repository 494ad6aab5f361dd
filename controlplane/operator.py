"""The FnService reconciler: `kubectl apply` of an FnService registers or updates the service
through the admin API (`fnplane.admin.deploy`), its deletion removes it
(`fnplane.admin.delete`, held by a finalizer so a deletion while the operator is down is not
lost), and what fnplane knows of it (Ready condition, URL, replicas, last cold start) is
written back through the status subresource.

FnServices live in one namespace (the operator's); their names are the services' names in
fnplane's registry, so an FnService takes over a service of the same name deployed with
`fnplane deploy`. Wiring and translation only: specs are validated by `spec_from_manifest`
and the registry, as for `fnplane deploy -f`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.specfile import spec_from_manifest, traffic_from_manifest
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import DeployRequest, NameRequest, ServiceStatus, SpecError
from partitions.kubeapi import (
    Changed,
    ListWatch,
    Synced,
    api_reason,
    load_client,
    read_json,
    threadsafe_put,
)

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "fnplane.dev", "v1alpha1", "fnservices"
FINALIZER = "fnplane.dev/registry"
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: str | None = None  # None: in-cluster service account, else ~/.kube/config
    context: str | None = None
    namespace: str = ""  # "" = the context's (or service account's) namespace
    status_interval_s: float = 5.0  # how often status is refreshed from fnplane
    watch_timeout_s: float = 300.0
    request_timeout_s: float = 10.0
    user_agent: str = "fnplane-operator/0.1"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(st: ServiceStatus) -> tuple[str, str, str]:
    """(status, reason, message) of the Ready condition, from what fnplane knows."""
    if st.ready_pods:
        return "True", "PodsReady", f"{st.ready_pods} pod(s) ready"
    if st.last_error:
        return "False", "PodsFailing", st.last_error[:1000]
    if st.spec.scaling.min_scale == 0:
        return "True", "ScaledToZero", "no pod; the first request starts one"
    return "False", "PodsStarting", f"waiting for {st.spec.scaling.min_scale} pod(s)"


def status_for(st: ServiceStatus, generation: int, old: dict[str, Any]) -> dict[str, Any]:
    """The status subresource of an FnService. The condition's transition time changes only
    when its status does, as the API conventions ask."""
    cond_status, reason, message = ready_condition(st)
    return _with_condition({
        "observedGeneration": generation,
        "url": st.url,
        "replicas": sum(1 for p in st.pods if p.state in ("starting", "ready", "unready")),
        "readyReplicas": st.ready_pods,
        **({"latestCreatedRevisionName": st.spec.latest_revision,
            "latestReadyRevisionName": st.latest_ready_revision,
            "trafficSummary": ",".join(f"{t.revision}={t.percent}%"
                                       for t in st.spec.traffic if t.percent),
            "traffic": [{"revisionName": t.revision, "percent": t.percent,
                         **({"tag": t.tag} if t.tag else {}),
                         **({"latestRevision": True} if t.latest else {})}
                        for t in st.spec.traffic],
            "revisions": [{"name": r.spec.name, "ready": r.ready,
                           "readyReplicas": r.ready_pods, "percent": r.percent,
                           **({"message": r.last_error[:500]} if r.last_error else {})}
                          for r in st.revisions]} if st.spec.revisions else {}),
        **({"lastColdStart": {
            "pod": st.last_cold_start.pod,
            "node": st.last_cold_start.node,
            "at": _iso(st.last_cold_start.request_in),
            "totalMs": st.last_cold_start.stages_ms()["total"],
            "stagesMs": {k: v for k, v in st.last_cold_start.stages_ms().items()
                         if k != "total"},
        }} if st.last_cold_start else {}),
    }, old, cond_status, reason, message)


def _with_condition(status: dict[str, Any], old: dict[str, Any], cond_status: str,
                    reason: str, message: str) -> dict[str, Any]:
    before = next((c for c in old.get("conditions") or [] if c.get("type") == "Ready"), {})
    since = before.get("lastTransitionTime") if before.get("status") == cond_status else None
    status["conditions"] = [{"type": "Ready", "status": cond_status, "reason": reason,
                             "message": message,
                             "lastTransitionTime": since or _iso(time.time())}]
    return status


class FnServiceOperator(Component):
    kind = "operator"

    def __init__(self, bus: Bus, config: OperatorConfig) -> None:
        super().__init__(bus)
        self.config = config
        self.namespace = config.namespace
        self.objects: dict[str, dict[str, Any]] = {}  # the newest FnService of each name
        self.api: client.ApiClient | None = None
        self.custom: client.CustomObjectsApi | None = None
        self.watch: ListWatch | None = None
        self._queue: asyncio.Queue[Synced | Changed] = asyncio.Queue()
        self._stopping = False

    async def start(self) -> None:
        cfg = self.config
        try:
            self.api, ns = await asyncio.to_thread(load_client, cfg.kubeconfig, cfg.context,
                                                   user_agent=cfg.user_agent)
            self.namespace = cfg.namespace or ns
            self.custom = client.CustomObjectsApi(self.api)
            self.watch = ListWatch(
                "fnservices",
                functools.partial(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                  self.namespace, PLURAL),
                threadsafe_put(asyncio.get_running_loop(), self._queue),
                watch_timeout_s=cfg.watch_timeout_s, request_timeout_s=cfg.request_timeout_s,
            )
            self.watch.start()
            self.tasks.spawn(self._run(), name="reconcile")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self.watch is not None:
            await asyncio.to_thread(self.watch.stop)
        await super().stop()
        if self.api is not None:
            self.api.close()

    async def _run(self) -> None:
        """Events only say which FnServices changed: each round takes every event waiting
        (the cache follows them in order), then reconciles each changed name once, from the
        object as the API server has it now. Reconciling the event's own object deployed
        twice per create: the finalizer patch's MODIFIED event still carried no status, so
        the generation looked unregistered. Status refreshes run in between, every
        `status_interval_s`."""
        next_refresh = time.monotonic() + self.config.status_interval_s
        while True:
            try:
                item: Synced | Changed | None = await asyncio.wait_for(
                    self._queue.get(), max(0.0, next_refresh - time.monotonic()))
            except TimeoutError:
                item = None
            try:
                dirty: dict[str, None] = {}  # ordered set of names
                while item is not None:
                    self._observe(item, dirty)
                    item = self._queue.get_nowait() if not self._queue.empty() else None
                for name in dirty:
                    if name in self.objects:
                        try:
                            await self.reconcile(self.objects[name])
                        except (ApiException, OSError) as exc:  # the others still go
                            log.warning("operator: reconciling %s: %s (retried on its next "
                                        "event)", name, exc)
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.config.status_interval_s
                    await self.refresh_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("operator: reconcile failed")

    def _observe(self, item: Synced | Changed, dirty: dict[str, None]) -> None:
        if isinstance(item, Synced):
            self.objects = {o["metadata"]["name"]: o for o in item.items}
            dirty.update(dict.fromkeys(self.objects))
            return
        name = item.obj["metadata"]["name"]
        if item.type == "DELETED":
            self.objects.pop(name, None)
            dirty.pop(name, None)
        else:
            self.objects[name] = item.obj
            dirty[name] = None

    # ---- reconcile ---------------------------------------------------------------------------

    async def reconcile(self, hint: dict[str, Any]) -> None:
        """Bring fnplane to the FnService named by `hint`, read afresh: the cache (and any
        event) may be older than the operator's own last write."""
        obj = await self._get(hint["metadata"]["name"])
        if obj is None:
            return
        meta = obj["metadata"]
        name = meta["name"]
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []):
                try:
                    await self._admin(ep.ADMIN_DELETE, NameRequest(name=name))
                except RemoteError as exc:
                    if exc.code is not ErrorCode.NOT_FOUND:
                        log.warning("operator: deleting %s: %s (retried)", name, exc.message)
                        return
                await self._set_finalizers(obj, remove=True)
                log.info("operator: %s deleted", name)
            return
        if FINALIZER not in (meta.get("finalizers") or []):
            got = await self._set_finalizers(obj, remove=False)
            if got is None:
                return  # gone meanwhile
            obj = got
        status = obj.get("status") or {}
        generation = int(obj["metadata"].get("generation") or 0)
        if status.get("observedGeneration") == generation and status.get("url"):
            return  # this generation is registered already (e.g. after an operator restart)
        try:
            spec = spec_from_manifest(obj)
            traffic_from_manifest(obj)
        except (SpecError, TypeError, ValueError) as exc:
            await self._status_of(obj, _with_condition(
                {**status, "observedGeneration": generation}, status, "False", "InvalidSpec",
                str(exc)))
            return
        try:
            reply = await self._admin(ep.ADMIN_DEPLOY, DeployRequest(
                spec=spec, **traffic_from_manifest(obj)))
        except RemoteError as exc:
            await self._status_of(obj, _with_condition(
                {**status, "observedGeneration": generation}, status, "False", "DeployFailed",
                exc.message))
            return
        log.info("operator: %s registered (generation %d)", name, generation)
        await self._status_of(obj, status_for(reply, generation, status))

    async def refresh_all(self) -> None:
        for name, obj in list(self.objects.items()):
            status = obj.get("status") or {}
            if obj["metadata"].get("deletionTimestamp") or not status.get("url"):
                continue  # deleting, or not registered (invalid spec, failed deploy)
            try:
                st = await self._admin(ep.ADMIN_DESCRIBE, NameRequest(name=name))
            except RemoteError:
                continue
            new = status_for(st, int(status.get("observedGeneration") or 0), status)
            if new != status:
                await self._status_of(obj, new)

    # ---- I/O ----------------------------------------------------------------------------------

    async def _admin(self, endpoint: ep.Endpoint[Any, Any], msg: Any) -> Any:
        return await self.bus.call(endpoint, msg, timeout=5.0)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """One call on an FnService; None when it is gone (404). Other errors raise."""

        def call() -> Any:
            return read_json(fn(GROUP, VERSION, self.namespace, PLURAL, *args,
                                _preload_content=False,
                                _request_timeout=self.config.request_timeout_s, **kwargs))

        try:
            obj: dict[str, Any] = await asyncio.to_thread(call)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        name = obj.get("metadata", {}).get("name")
        if name in self.objects:
            self.objects[name] = obj
        return obj

    async def _get(self, name: str) -> dict[str, Any] | None:
        assert self.custom is not None
        return await self._call(self.custom.get_namespaced_custom_object, name)

    async def _patch(self, obj: dict[str, Any], body: dict[str, Any], *,
                     status: bool = False) -> dict[str, Any] | None:
        """A merge patch that carries the resourceVersion it was computed from: the API
        server refuses it with 409 when the object changed since (optimistic locking), so a
        list such as `finalizers` is never written back over another controller's change."""
        assert self.custom is not None
        fn = (self.custom.patch_namespaced_custom_object_status if status
              else self.custom.patch_namespaced_custom_object)
        meta = {**body.get("metadata", {}),
                "resourceVersion": obj["metadata"].get("resourceVersion")}
        return await self._call(fn, obj["metadata"]["name"], {**body, "metadata": meta},
                                _content_type=MERGE_PATCH)

    async def _set_finalizers(self, obj: dict[str, Any], *, remove: bool,
                              attempts: int = 5) -> dict[str, Any] | None:
        """Add or remove our finalizer, read-modify-write, again from a fresh read on 409."""
        current: dict[str, Any] | None = obj
        for _ in range(attempts):
            if current is None:
                return None
            have = list(current["metadata"].get("finalizers") or [])
            want = [f for f in have if f != FINALIZER] + ([] if remove else [FINALIZER])
            if want == have:
                return current
            try:
                return await self._patch(current, {"metadata": {"finalizers": want or None}})
            except ApiException as exc:
                if exc.status != 409:
                    log.warning("operator: finalizer of %s: %s", obj["metadata"]["name"],
                                api_reason(exc))
                    return None
            current = await self._get(obj["metadata"]["name"])
        log.warning("operator: finalizer of %s: still conflicting after %d tries (retried "
                    "on its next event)", obj["metadata"]["name"], attempts)
        return None

    async def _status_of(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        """Write the status computed from `obj`; on 409 again on the newer object if it is
        the same generation (only metadata or status changed), else leave it: the new
        generation's event reconciles it."""
        generation = obj["metadata"].get("generation")
        current: dict[str, Any] | None = obj
        for _ in range(5):
            if current is None or current["metadata"].get("generation") != generation:
                return
            try:
                await self._patch(current, {"status": status}, status=True)
                return
            except ApiException as exc:
                if exc.status != 409:
                    log.warning("operator: status of %s: %s", obj["metadata"]["name"],
                                api_reason(exc))
                    return
            current = await self._get(obj["metadata"]["name"])
