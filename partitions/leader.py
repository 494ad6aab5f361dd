"""Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection`
does it, for the components that must have one writer: the `kubernetes` node agent (it
creates, binds and deletes pods), the FnService operator and the coordinator. During a
rolling update the old and the new pod run at once; without a Lease both act (both create
the pod a StartPod names, and the one whose bind gets 409 deleted it).

The protocol (client-go `leaderelection.go`, `resourcelock/leaselock.go`): a candidate reads
the Lease; it may take it when nobody holds it, or when the holder's record has not changed
for `leaseDurationSeconds` *as seen by this candidate's clock* (client-go trusts its own
observation time, not the holder's `renewTime`, so clock skew between nodes does not hand
the lease over early). Every write is an update carrying the resourceVersion it read, so of
two candidates only one wins (the other gets 409 Conflict). The holder renews every
`retry_period_s`; when it cannot renew for `renew_deadline_s` it stops leading, before its
lease can expire for the others. A holder that stops cleanly releases the Lease (empty
holder, 1 s duration: client-go's `ReleaseOnCancel`) so its successor takes over at once.

`decide` is the pure core; `LeaseLock` the API calls; `Elected` runs a component only while
it leads. A lost lease ends the component for good (`lost` is set): the process exits and
its Deployment starts it again as a candidate, as client-go's `OnStoppedLeading` usually
does, rather than restarting a half-stopped component in place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kernel.component import Component
from partitions.kubeapi import api_reason, load_client, read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseConfig:
    name: str  # the Lease's name, one per single-writer component (fnplane-node, ...)
    identity: str  # this candidate: its pod name and a random suffix
    namespace: str = ""  # "" = the kubeconfig's or service account's
    kubeconfig: str | None = None
    # client-go's defaults (kube-controller-manager's too): 15 s, 10 s, 2 s.
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    request_timeout_s: float = 5.0
    user_agent: str = "fnplane-leader/0.1"

    def __post_init__(self) -> None:
        if not self.name or not self.identity:
            raise ValueError("a lease needs a name and a candidate identity")
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("need retry period < renew deadline < lease duration")


# ---- the decision (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """The Lease's spec as last read, and when this candidate saw it change."""

    holder: str
    duration_s: float
    transitions: int
    seen_at: float  # this candidate's monotonic clock


def decide(observed: Observed | None, me: str, now: float) -> str:
    """'create' (no Lease yet), 'renew' (ours), 'acquire' (free or expired) or 'wait'."""
    if observed is None:
        return "create"
    if observed.holder == me:
        return "renew"
    if not observed.holder or now >= observed.seen_at + observed.duration_s:
        return "acquire"
    return "wait"


def micro_time(ts: float) -> str:
    """A MicroTime as the API serializes it."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- the API calls -----------------------------------------------------------------------------


class LeaseLock:
    """Read and write one Lease; writes are updates with the resourceVersion read last."""

    def __init__(self, api: client.ApiClient, namespace: str, config: LeaseConfig) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.config = config
        self.lease: dict[str, Any] | None = None  # the newest Lease read or written
        self.observed: Observed | None = None

    async def _call(self, fn: Any, *args: Any) -> dict[str, Any]:
        def call() -> Any:
            return read_json(fn(*args, _preload_content=False,
                                _request_timeout=self.config.request_timeout_s))

        return await asyncio.to_thread(call)

    def _seen(self, lease: dict[str, Any], now: float) -> None:
        spec = lease.get("spec") or {}
        obs = Observed(str(spec.get("holderIdentity") or ""),
                       float(spec.get("leaseDurationSeconds") or 0),
                       int(spec.get("leaseTransitions") or 0), now)
        old = self.observed
        if old is not None and (old.holder, old.duration_s, old.transitions) == (
                obs.holder, obs.duration_s, obs.transitions) and (
                (self.lease or {}).get("spec", {}).get("renewTime")
                == spec.get("renewTime")):
            obs = old  # unchanged: the expiry still counts from when it last changed
        self.lease, self.observed = lease, obs

    async def try_acquire_or_renew(self) -> bool:
        """One round of client-go's `tryAcquireOrRenew`: True when we hold the lease now."""
        cfg, now = self.config, time.monotonic()
        try:
            self._seen(await self._call(self.coord.read_namespaced_lease, cfg.name,
                                        self.namespace), now)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.lease, self.observed = None, None
        action = decide(self.observed, cfg.identity, now)
        if action == "wait":
            return False
        wall = micro_time(time.time())
        spec = {"holderIdentity": cfg.identity,
                "leaseDurationSeconds": max(1, round(cfg.lease_duration_s)),
                "renewTime": wall}
        if action == "create":
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": cfg.name, "namespace": self.namespace},
                    "spec": {**spec, "acquireTime": wall, "leaseTransitions": 0}}
            try:
                self._seen(await self._call(self.coord.create_namespaced_lease,
                                            self.namespace, body), now)
            except ApiException as exc:
                if exc.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        assert self.lease is not None and self.observed is not None
        old_spec = self.lease.get("spec") or {}
        if action == "acquire":
            spec["acquireTime"] = wall
            spec["leaseTransitions"] = self.observed.transitions + 1
        else:
            spec["acquireTime"] = old_spec.get("acquireTime") or wall
            spec["leaseTransitions"] = self.observed.transitions
        body = {**self.lease, "spec": {**old_spec, **spec}}
        try:
            self._seen(await self._call(self.coord.replace_namespaced_lease, cfg.name,
                                        self.namespace, body), now)
        except ApiException as exc:
            if exc.status == 409:  # someone wrote it since we read it: not ours this round
                return False
            raise
        return True

    async def release(self) -> None:
        """Hand the lease over at once (client-go's ReleaseOnCancel), if it is still ours."""
        if self.lease is None or self.observed is None:
            return
        if self.observed.holder != self.config.identity:
            return
        spec = {**(self.lease.get("spec") or {}), "holderIdentity": "",
                "leaseDurationSeconds": 1, "renewTime": micro_time(time.time())}
        try:
            await self._call(self.coord.replace_namespaced_lease, self.config.name,
                             self.namespace, {**self.lease, "spec": spec})
        except ApiException as exc:
            log.info("lease %s: not released (%s); it expires on its own", self.config.name,
                     api_reason(exc))


# ---- a component that runs only while it leads ------------------------------------------------


class Elected(Component):
    """Runs `inner` while this candidate holds the Lease. Shares the inner component's bus
    (and so its identity on NATS), which only the inner component closes."""

    def __init__(self, inner: Component, config: LeaseConfig, *,
                 api: client.ApiClient | None = None) -> None:
        super().__init__(inner.bus)
        self.kind = inner.kind
        self.inner = inner
        self.config = config
        self.api = api
        self.lock: LeaseLock | None = None
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()  # leadership lost, or the inner component failed
        self._owns_api = api is None
        self._inner_started = False
        self._stopped = False

    async def start(self) -> None:
        namespace = self.config.namespace
        if self.api is None:
            self.api, ns = await asyncio.to_thread(load_client, self.config.kubeconfig, None,
                                                   user_agent=self.config.user_agent)
            namespace = namespace or ns
        self.lock = LeaseLock(self.api, namespace or "default", self.config)
        self.tasks.spawn(self._run(), name=f"lease-{self.config.name}")

    async def _run(self) -> None:
        assert self.lock is not None
        cfg = self.config
        while not await self._round():
            await asyncio.sleep(cfg.retry_period_s)
        log.info("lease %s: %s leads", cfg.name, cfg.identity)
        self.leading.set()
        try:
            await self.inner.start()
            self._inner_started = True
        except Exception:
            log.exception("lease %s: the component failed to start", cfg.name)
            self.lost.set()
            return
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(cfg.retry_period_s)
            if await self._round():
                renewed = time.monotonic()
            elif (time.monotonic() - renewed >= cfg.renew_deadline_s
                  or (self.lock.observed is not None
                      and self.lock.observed.holder not in ("", cfg.identity))):
                log.error("lease %s: leadership lost (%s); stopping", cfg.name,
                          self.lock.observed.holder if self.lock.observed else "unreadable")
                self.leading.clear()
                self.lost.set()
                await self._stop_inner()
                return

    async def _round(self) -> bool:
        assert self.lock is not None
        try:
            return await self.lock.try_acquire_or_renew()
        except (ApiException, OSError, ValueError) as exc:
            log.warning("lease %s: %s", self.config.name,
                        api_reason(exc) if isinstance(exc, ApiException) else exc)
            return False

    async def _stop_inner(self) -> None:
        if self._inner_started:
            self._inner_started = False
            await self.inner.stop()

    async def stop(self) -> None:
        """Idempotent: stop leading, stop the inner component, release the Lease."""
        if self._stopped:
            return
        self._stopped = True
        await self.tasks.close()
        was_leading = self._inner_started
        await self._stop_inner()
        if was_leading and self.lock is not None and not self.lost.is_set():
            await self.lock.release()
        if not was_leading:
            await self.bus.close()  # never handed to the inner component's stop
        if self._owns_api and self.api is not None:
            self.api.close()
