"""The coordinator's instance runtime on Kubernetes: each control function is a Deployment
(deploy/), and the coordinator scales it through the Deployment's `scale` subresource, as an
HPA does; the ReplicaSet controller starts and stops the pods.

An instance is a pod of the Deployment that is Running, not terminating, with every
container running; its id is the pod name (the `schedule` container gets it through the
downward API as FNPLANE_INSTANCE_ID, so its heartbeats carry the same id). The pods are kept
current by list+watch rather than listed at each call: `instances()` is synchronous and
called on every coordinator tick, and only a watch sees a pod go away at once, which is
what lets `on_exit` reassign its partition without waiting for missed heartbeats.

`stop()` stops watching and nothing else: the Deployments keep their replicas, so a
restarting control plane never takes instances down with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane.elastic import ExitCallback
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

USER_AGENT = "fnplane-coordinator/0.1"


# ---- which pods are instances (pure) ----------------------------------------------------------


def pod_is_instance(pod: dict[str, Any]) -> bool:
    """Running, not being deleted, every container running (a crashed container waits in
    CrashLoopBackOff while the pod stays Running: its process is gone all the same)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    return all("running" in (c.get("state") or {})
               for c in status.get("containerStatuses") or [])


def restarts(pod: dict[str, Any]) -> int:
    return sum(int(c.get("restartCount") or 0)
               for c in (pod.get("status") or {}).get("containerStatuses") or [])


@dataclass
class InstanceSet:
    """The instances of one Deployment, from what list+watch delivers. Each method answers
    the pods that just stopped being instances: deleted, terminating, failed, or restarted
    by the kubelet between two looks (a restart count that grew)."""

    live: dict[str, int] = field(default_factory=dict)  # pod name → its restart count
    known: set[str] = field(default_factory=set)  # every pod of the Deployment, live or not

    def observe(self, kind: str, pod: dict[str, Any]) -> list[str]:
        name = (pod.get("metadata") or {}).get("name", "")
        was = self.live.pop(name, None)
        if kind == "DELETED":
            self.known.discard(name)
            return [name] if was is not None else []
        self.known.add(name)
        if not pod_is_instance(pod):
            return [name] if was is not None else []
        self.live[name] = now = restarts(pod)
        return [name] if was is not None and now > was else []

    def sync(self, pods: list[dict[str, Any]]) -> list[str]:
        names = {(p.get("metadata") or {}).get("name", "") for p in pods}
        gone = [n for n in self.live if n not in names]
        for n in gone:
            del self.live[n]
        self.known = set(names)
        return gone + [n for p in pods for n in self.observe("MODIFIED", p)]


# ---- the runtime --------------------------------------------------------------------------


class KubernetesRuntime:
    """`Runtime` over Deployments: kind → Deployment name, all in one namespace.

    API errors in `scale` and `kill` are logged, not raised: the coordinator's loop calls
    again on its next tick, and an exception there would stop repartitioning altogether.
    `start` (called by `scale` if nobody did) does raise: a missing Deployment or a
    forbidden call is a deployment error to crash on.
    """

    def __init__(
        self,
        namespace: str,
        deployments: dict[str, str],
        api: client.ApiClient | None = None,
        *,
        kubeconfig: str | None = None,
        user_agent: str = USER_AGENT,
        watch_timeout_s: float = 300.0,
        request_timeout_s: float = 10.0,
        sync_timeout_s: float = 30.0,
        kill_grace_s: int = 1,
    ) -> None:
        self.namespace = namespace  # "" = the kubeconfig's or the service account's
        self.deployments = dict(deployments)
        self.api = api
        self.kubeconfig = kubeconfig
        self.user_agent = user_agent
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.sync_timeout_s = sync_timeout_s
        self.kill_grace_s = kill_grace_s
        self.on_exit: ExitCallback | None = None
        self.apps: Any = None  # AppsV1Api and CoreV1Api, once started
        self.core: Any = None
        self.sets = {kind: InstanceSet() for kind in deployments}
        self.watches: list[ListWatch] = []
        self._owns_api = api is None
        self._queue: asyncio.Queue[Synced | Changed] = asyncio.Queue()
        self._synced = {kind: asyncio.Event() for kind in deployments}
        self._consumer: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._scale_lock = asyncio.Lock()
        self._started = False
        self._stopped = False

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Idempotent: read each Deployment's pod selector from its scale subresource, then
        list+watch its pods until the first list arrived."""
        async with self._start_lock:
            if self._started:
                return
            if self.api is None:
                self.api, ns = await asyncio.to_thread(load_client, self.kubeconfig, None,
                                                       user_agent=self.user_agent)
                self.namespace = self.namespace or ns
            try:
                await self._start()
            except BaseException:
                await self.stop()
                raise
            log.info("kubernetes runtime: %s", ", ".join(
                f"{k}={len(s.live)}" for k, s in self.sets.items()))

    async def _start(self) -> None:
        self.apps = client.AppsV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        deliver = threadsafe_put(asyncio.get_running_loop(), self._queue)
        for kind, name in self.deployments.items():
            scale = await self._read_scale(name)
            selector = (scale.get("status") or {}).get("selector", "")
            if not selector:
                raise RuntimeError(f"deployment {self.namespace}/{name} selects no pods")
            self.watches.append(ListWatch(
                kind, functools.partial(self.core.list_namespaced_pod, self.namespace),
                deliver, label_selector=selector, watch_timeout_s=self.watch_timeout_s,
                request_timeout_s=self.request_timeout_s))
        self._consumer = asyncio.create_task(self._consume(), name="kube-runtime-watch")
        for w in self.watches:
            w.start()
        try:
            async with asyncio.timeout(self.sync_timeout_s):
                await asyncio.gather(*(e.wait() for e in self._synced.values()))
        except TimeoutError:
            errors = "; ".join(f"{w.kind}: {w.last_error}" for w in self.watches
                               if w.last_error)
            raise RuntimeError(f"kubernetes: pods of {sorted(self.deployments.values())} "
                               f"not listed within {self.sync_timeout_s:g}s "
                               f"({errors or 'no answer'})") from None
        self._started = True

    async def stop(self) -> None:
        """Idempotent. Stops watching; never scales: the pods keep running."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.watches))
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
        if self._owns_api and self.api is not None:
            self.api.close()

    async def _consume(self) -> None:
        while True:
            ev = await self._queue.get()
            group = self.sets[ev.kind]
            if isinstance(ev, Synced):
                exited = group.sync(ev.items)
                self._synced[ev.kind].set()
            else:
                exited = group.observe(ev.type, ev.obj)
            for instance in exited:
                log.warning("kubernetes runtime: %s %s is gone", ev.kind, instance)
                if self.on_exit is not None and not self._stopped:
                    self.on_exit(ev.kind, instance)

    # ---- the Runtime verbs ----------------------------------------------------------------

    def kinds(self) -> list[str]:
        return list(self.deployments)

    def instances(self, kind: str) -> list[str]:
        return sorted(self.sets[kind].live) if kind in self.sets else []

    async def scale(self, kind: str, n: int) -> None:
        """Set the Deployment's replicas through its scale subresource, only when they
        differ: `kubectl scale` of a Deployment the coordinator owns is overridden."""
        await self.start()
        name = self.deployments[kind]
        async with self._scale_lock:
            try:
                current = ((await self._read_scale(name)).get("spec") or {}).get("replicas", 0)
                if current == n:
                    return
                # A merge patch, as `kubectl scale` sends; the generated client would pick
                # JSON patch for a dict body.
                await self._call(self.apps.patch_namespaced_deployment_scale, name,
                                 self.namespace, {"spec": {"replicas": n}},
                                 _content_type="application/merge-patch+json")
                log.info("kubernetes runtime: %s (%s) replicas %d -> %d", kind, name,
                         current, n)
            except ApiException as exc:
                log.warning("kubernetes runtime: scaling %s to %d: %s %s", name, n,
                            exc.status, api_reason(exc))

    async def kill(self, kind: str, instance: str) -> None:
        """Delete the pod (a short grace: it is killed because it went silent); the
        ReplicaSet controller replaces it and the watch reports it gone. Only pods seen to
        belong to the kind's Deployment: the Role allows deleting any pod of the namespace."""
        if instance not in self.sets.get(kind, InstanceSet()).known:
            return
        try:
            await self._call(self.core.delete_namespaced_pod, instance, self.namespace,
                             grace_period_seconds=self.kill_grace_s)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("kubernetes runtime: deleting pod %s: %s %s", instance,
                            exc.status, api_reason(exc))

    # ---- API calls ------------------------------------------------------------------------

    async def _read_scale(self, name: str) -> dict[str, Any]:
        try:
            return await self._call(self.apps.read_namespaced_deployment_scale, name,
                                    self.namespace)
        except ApiException as exc:
            if self._started:
                raise
            raise RuntimeError(f"kubernetes: deployments/{name}/scale in namespace "
                               f"{self.namespace}: {exc.status} {api_reason(exc)}") from None

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            return read_json(fn(*args, _preload_content=False,
                                _request_timeout=self.request_timeout_s, **kwargs))

        return await asyncio.to_thread(call)
