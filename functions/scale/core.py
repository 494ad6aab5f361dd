"""What `scale` knows about each service, and the plan it derives: how many pods to add,
which to stop. Pure: the adapter feeds it messages and the time, and carries out the plan.

Pod bookkeeping lives here so the adapter stays a translator: a pod is `placing` from the
moment we ask `schedule` for it until the node reports it, then follows the node's events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from functions.scale.kpa import Autoscaler, Decision
from kernel.messages import Demand, PodEvent, ServiceSpec, ServingMode

# A report older than this many metric intervals is treated as gone (activator died).
STALE_REPORTS = 3.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
# A pod with no room is placed again soon (kube-scheduler retries unschedulable pods with a
# backoff of at most 10 s): requests wait for it in the activators until their own timeout.
UNSCHEDULABLE_BACKOFF_MAX_S = 5.0


def within_limit(spec: ServiceSpec, limit: int) -> ServiceSpec:
    """The spec `scale` acts on: max-scale capped by the cluster's max-scale limit (and an
    unbounded max-scale, 0, becomes the limit). No limit (0): the spec as it is."""
    sc = spec.scaling
    if limit <= 0 or 0 < sc.max_scale <= limit:
        return spec
    capped = msgspec.structs.replace(sc, max_scale=limit, min_scale=min(sc.min_scale, limit),
                                     initial_scale=min(sc.initial_scale, limit),
                                     activation_scale=min(sc.activation_scale, limit))
    return msgspec.structs.replace(spec, scaling=capped)


# A scale-down rate no pod count reaches: an unreachable revision drops to its target at once.
UNBOUNDED_RATE = 1e9


def reachable_scaling(spec: ServiceSpec) -> ServiceSpec:
    """Knative's routingState `reserve`: a revision no traffic target names gets no
    requests, so it keeps no pods whatever its min-scale (nor activation-scale), and, as
    Knative's KPA for an unreachable revision, skips the scale-down delay and rate; it still
    starts with its initial scale, which tells whether it can become ready at all."""
    if spec.routing_state != "reserve":
        return spec
    sc = msgspec.structs.replace(spec.scaling, min_scale=0, activation_scale=0,
                                 scale_down_delay_s=0.0, max_scale_down_rate=UNBOUNDED_RATE)
    return msgspec.structs.replace(spec, scaling=sc)


@dataclass
class TrackedPod:
    pod: str
    state: str  # placing | starting | ready | unready | terminating
    node: str = ""
    since: float = 0.0


@dataclass(frozen=True)
class Plan:
    service: str
    desired: int
    start: int  # new pods to place
    stop: list[TrackedPod]  # pods to stop, with their nodes
    decision: Decision | None
    mode_change: ServingMode | None = None  # "proxy"/"direct" when the gateway path must switch


@dataclass
class ServiceScaler:
    spec: ServiceSpec
    autoscaler: Autoscaler
    pods: dict[str, TrackedPod] = field(default_factory=dict)
    reports: dict[str, Demand] = field(default_factory=dict)
    desired: int = 0
    backoff_until: float = 0.0
    backoff_s: float = 0.0
    last_error: str = ""
    mode: ServingMode = "proxy"
    # Pods were reclaimed from this idle service for another: it stays at most this many
    # pods until it has requests again (None: no cap).
    reclaimed_cap: int | None = None

    @classmethod
    def for_spec(cls, spec: ServiceSpec, now: float | None = None) -> ServiceScaler:
        """`now`: when this scaler starts watching. Pods it finds running (a restarted
        `scale`, adopted pods) then get the scale-to-zero grace before they are stopped,
        instead of being stopped at the first tick for lack of history."""
        autoscaler = Autoscaler(spec.scaling, spec.container_concurrency)
        if now is not None:
            autoscaler.last_active = now
        return cls(spec, autoscaler)

    def update_spec(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.autoscaler.spec = spec.scaling
        self.autoscaler.container_concurrency = spec.container_concurrency

    # ---- inputs ---------------------------------------------------------------------------

    def observe(self, demand: Demand) -> None:
        self.reports[demand.reporter] = demand

    def waiting(self, now: float, interval_s: float) -> int:
        """Requests buffered in activators now, by fresh reports."""
        return sum(d.buffered for d in self.reports.values()
                   if d.source == "activator" and now - d.ts <= STALE_REPORTS * interval_s)

    def reclaimable(self, now: float, interval_s: float) -> list[TrackedPod]:
        """Ready pods this service could give up: none while it has any request, none
        below its min-scale."""
        if self.concurrency(now, interval_s)[0] > 0:
            return []
        ready = [p for p in self.pods.values() if p.state == "ready" and p.node]
        spare = len(ready) - self.spec.scaling.min_scale
        return ready[:max(spare, 0)]

    def concurrency(self, now: float, interval_s: float) -> tuple[float, float]:
        """(concurrency, requests per second) from fresh reports. Activators and pods count
        the same proxied requests, so the two sums are not added: the larger one wins (pods
        see traffic that bypassed every activator; activators see requests still buffered)."""
        conc = {"activator": 0.0, "pods": 0.0}
        rps = 0.0
        for name, d in list(self.reports.items()):
            if now - d.ts > STALE_REPORTS * interval_s:
                del self.reports[name]
                continue
            conc[d.source] += d.buffered + d.in_flight
            if d.source == "activator":
                rps += d.requests / interval_s
        return max(conc.values()), rps

    def on_pod_event(self, ev: PodEvent, now: float) -> None:
        if ev.state in ("stopped", "failed"):
            self.pods.pop(ev.pod, None)
            if ev.state == "failed":
                self.backoff_s = min(max(self.backoff_s * 2, BACKOFF_FIRST_S), BACKOFF_MAX_S)
                self.backoff_until = now + self.backoff_s
                self.last_error = ev.reason
            return
        pod = self.pods.get(ev.pod)
        if pod is None:
            pod = self.pods[ev.pod] = TrackedPod(ev.pod, ev.state, ev.node, now)
        if pod.state != "terminating":  # a late "ready" must not resurrect a stopping pod
            pod.state, pod.node, pod.since = ev.state, ev.node, now
        if ev.state == "ready":
            self.backoff_s, self.last_error = 0.0, ""

    def nodes_lost(self, nodes: set[str]) -> list[str]:
        """The coordinator reported these nodes lost: their pods no longer count, so the
        next plan replaces them elsewhere. Not a failure of the service (no backoff). The
        pods dropped."""
        gone = [p.pod for p in self.pods.values() if p.node in nodes]
        for pod in gone:
            del self.pods[pod]
        return gone

    def placing(self, pod: str, now: float) -> None:
        self.pods[pod] = TrackedPod(pod, "placing", "", now)

    def placed(self, pod: str, node: str) -> None:
        tracked = self.pods.get(pod)
        if tracked is not None and tracked.state == "placing":
            tracked.node = node

    def placement_failed(self, pod: str, reason: str, now: float) -> None:
        """No room for the pod now: try again after a short backoff."""
        self.pods.pop(pod, None)
        self.backoff_s = min(max(self.backoff_s * 2, BACKOFF_FIRST_S),
                             UNSCHEDULABLE_BACKOFF_MAX_S)
        self.backoff_until = now + self.backoff_s
        self.last_error = reason

    def retry_soon(self, now: float, after_s: float) -> None:
        """Room is being made (idle pods of others are stopping): try again shortly."""
        self.backoff_until = min(self.backoff_until, now + after_s)

    def reclaim(self, pod: str) -> None:
        """Another service takes this idle pod's room: stop it, and do not start it again
        until this service has requests."""
        tracked = self.pods.get(pod)
        if tracked is not None:
            tracked.state = "terminating"
        self.reclaimed_cap = self.counts()[1]

    # ---- the plan -------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(ready, current) where current counts pods placing, starting, ready or unready:
        an unready pod is alive and may be ready again, so it is not replaced (Knative
        counts not-ready pods as pending); it only stops counting as ready capacity."""
        ready = sum(1 for p in self.pods.values() if p.state == "ready")
        current = sum(1 for p in self.pods.values() if p.state != "terminating")
        return ready, current

    def plan(self, now: float, interval_s: float) -> Plan:
        conc, rps = self.concurrency(now, interval_s)
        self.autoscaler.record(now, conc, rps)
        ready, current = self.counts()
        decision = self.autoscaler.scale(now, ready, current)
        sc = self.spec.scaling
        if decision is None:
            desired = max(sc.min_scale, 0)
        else:
            desired = decision.desired
        if self.reclaimed_cap is not None:
            if conc > 0:
                self.reclaimed_cap = None  # in demand again: the autoscaler decides
            else:
                desired = min(desired, max(self.reclaimed_cap, sc.min_scale))
        self.desired = desired
        start = 0
        stop: list[TrackedPod] = []
        if desired > current:
            # A crash-looping service waits out its backoff instead of spinning pods.
            if now >= self.backoff_until:
                start = desired - current
        elif desired < current:
            stop = self._pick_victims(current - desired)
        mode = decision.mode if decision is not None else "proxy"
        change = mode if mode != self.mode else None
        self.mode = mode
        return Plan(self.spec.name, desired, start, stop, decision, change)

    def _pick_victims(self, n: int) -> list[TrackedPod]:
        """Stop pods that are not serving first (starting, or unready, as a ReplicaSet
        deletes not-ready pods first), then the youngest ready ones: the oldest pods have the
        warmest caches. Pods still being placed are left to finish."""
        order = {"starting": 0, "unready": 0, "ready": 1}
        candidates = [p for p in self.pods.values() if p.state in order and p.node]
        candidates.sort(key=lambda p: (order[p.state], -p.since))
        victims = candidates[:n]
        for p in victims:
            p.state = "terminating"
        return victims

