"""The autoscaling decision, as Knative's KPA makes it, with no I/O and no clock of its own.

`Autoscaler.scale(now, ready_pods)` reads the concurrency (or RPS) samples recorded for one
service and returns the desired pod count, or `None` when it has never seen a sample (an
explicit "no decision", as knative/serving pkg/autoscaler/scaling/autoscaler.go).

Same knobs and meaning as Knative (`Scale` in autoscaler.go, the target from
pkg/reconciler/autoscaling/resources/target.go `ResolveMetricTarget`): the stable window
average drives normal scaling; the panic window (a percentage of the stable one) takes over
when demand exceeds the panic threshold, and in panic we never scale down; scale-up/down
rates bound each step; a scale-down delay keeps the maximum of recent decisions; an
autoscaler that starts with more than one ready pod (a restarted `scale`, a shard taken
over) starts in panic holding that count. Going to zero waits for the scale-to-zero grace
after the last activity. One deliberate addition: when the service has no pod and a request
is waiting, the decision is at once max(1, initial scale, activation scale, need) instead of
waiting for a window to fill — that is the scale-from-zero path. The README's autoscaling
section lists every difference that remains.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from kernel.messages import ScalingSpec

# Knative's container-concurrency-target-default (pkg/autoscaler/config/config.go): the
# per-pod concurrency when neither a target nor a container concurrency is declared.
CONTAINER_CONCURRENCY_TARGET_DEFAULT = 100.0
# autoscaling.TargetMin (pkg/apis/autoscaling/register.go): no target below this.
TARGET_MIN = 0.01


@dataclass(frozen=True)
class Decision:
    desired: int
    panic: bool
    stable_value: float
    panic_value: float
    reason: str
    excess_burst_capacity: float = -1.0

    @property
    def mode(self) -> str:
        """Knative's rule (pkg/reconciler/autoscaling/kpa/kpa.go): the activator is in the
        path at zero (want == 0) or without spare capacity (EBC < 0)."""
        return "direct" if self.desired > 0 and self.excess_burst_capacity >= 0 else "proxy"


def resolve_target(spec: ScalingSpec, container_concurrency: int) -> tuple[float, float]:
    """(target, total) as knative/serving ResolveMetricTarget: `total` is what one pod can
    take (the declared target, else the container concurrency, else 100; in RPS mode the RPS
    target), `target` is total × utilization, what the autoscaler aims for. A declared
    concurrency target above the container concurrency is capped by it."""
    if spec.metric == "rps":
        total = spec.target_rps
    elif spec.target_concurrency is not None:
        total = spec.target_concurrency
        if container_concurrency > 0:
            total = min(total, float(container_concurrency))
    else:
        total = float(container_concurrency) or CONTAINER_CONCURRENCY_TARGET_DEFAULT
    return max(TARGET_MIN, total * spec.target_utilization), total


def excess_burst_capacity(
    spec: ScalingSpec, container_concurrency: int, ready_pods: int, panic_value: float
) -> float:
    """EBC = ready pods × per-pod total − target burst capacity − observed panic value
    (knative/serving autoscaler.go `Scale`, "Compute excess burst capacity"). TBC −1: the
    activator stays in the path; 0: it leaves as soon as a pod is ready; with no ready pod the
    same rules hold (a positive TBC gives a negative EBC)."""
    tbc = spec.target_burst_capacity
    if tbc == 0:
        return 0.0
    if tbc < 0:
        return -1.0
    _, total = resolve_target(spec, container_concurrency)
    return float(math.floor(ready_pods * total - tbc - panic_value))


@dataclass
class Autoscaler:
    """Per-service scaler state; owned by one `scale` instance."""

    spec: ScalingSpec
    container_concurrency: int = 0
    _samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    _recent: deque[tuple[float, int]] = field(default_factory=deque)
    # Knative's panicTime (None: not panicking) and maxPanicPods.
    _panic_time: float | None = None
    _max_panic: int = 0
    _started: bool = False
    last_active: float = -math.inf
    _seen_any: bool = False

    # ---- inputs ---------------------------------------------------------------------------

    def record(self, now: float, concurrency: float, rps: float = 0.0) -> None:
        """One aggregated observation: requests buffered plus in flight, across activators."""
        self._seen_any = True
        self._samples.append((now, concurrency, rps))
        if concurrency > 0 or rps > 0:
            self.last_active = now
        horizon = now - self.spec.stable_window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    # ---- the decision --------------------------------------------------------------------

    @property
    def target(self) -> float:
        """Per-pod target (knative/serving ResolveMetricTarget)."""
        return resolve_target(self.spec, self.container_concurrency)[0]

    def _average(self, now: float, window_s: float) -> float | None:
        col = 2 if self.spec.metric == "rps" else 1
        values = [s[col] for s in self._samples if s[0] > now - window_s]
        return sum(values) / len(values) if values else None

    def _latest(self) -> float:
        if not self._samples:
            return 0.0
        return self._samples[-1][2 if self.spec.metric == "rps" else 1]

    def adopt(self, now: float, ready_pods: int) -> None:
        """Knative's `newAutoscaler`: a decider that finds more than one ready pod starts in
        panic holding that count, so a lost metric history does not halve a warm service.
        Called by the first decision (our pods are known only once the owner gathered them),
        or before it by whoever knows the pods already."""
        self._started = True
        if ready_pods > 1:
            self._panic_time, self._max_panic = now, ready_pods

    def scale(self, now: float, ready_pods: int, current_pods: int) -> Decision | None:
        """Desired pods for `now`; `current_pods` counts pods starting or ready."""
        sp = self.spec
        if not self._started:
            self.adopt(now, ready_pods)
        if not self._seen_any:
            return None
        stable = self._average(now, sp.stable_window_s) or 0.0
        panic_window = sp.stable_window_s * sp.panic_window_pct / 100.0
        panic_val = self._average(now, panic_window) or 0.0
        target = self.target
        ebc = excess_burst_capacity(sp, self.container_concurrency, ready_pods, panic_val)

        # Scale from zero: someone is waiting and nothing is coming. Answer at once.
        latest = self._latest()
        if current_pods == 0 and latest > 0:
            want = max(1, sp.initial_scale, sp.activation_scale, math.ceil(latest / target))
            return Decision(self._bound(want), False, stable, panic_val, "activation", ebc)

        # autoscaler.go: "Use 1 if there are zero current pods".
        base = max(ready_pods, 1)
        max_up = math.ceil(sp.max_scale_up_rate * base)
        max_down = math.floor(base / sp.max_scale_down_rate)
        dspc = math.ceil(stable / target)
        dppc = math.ceil(panic_val / target)
        desired_stable = min(max(dspc, max_down), max_up)
        desired_panic = min(max(dppc, max_down), max_up)
        if sp.activation_scale > 1:  # autoscaler.go: "If ActivationScale > 1 ..."
            if dspc > 0:
                desired_stable = max(desired_stable, sp.activation_scale)
            if dppc > 0:
                desired_panic = max(desired_panic, sp.activation_scale)

        # The rounded-up panic pod count against the ready pods (isOverPanicThreshold).
        if dppc / base >= sp.panic_threshold_pct / 100.0:
            self._panic_time = now  # begin, or extend
        elif self._panic_time is not None and self._panic_time + sp.stable_window_s < now:
            self._panic_time, self._max_panic = None, 0  # strictly after: "Before(now)"
        panic = self._panic_time is not None
        if panic:
            # In panic we never scale down: hold the highest count seen since it began, and
            # provision for the stable window too when it is the larger (as Knative).
            self._max_panic = max(self._max_panic, desired_stable, desired_panic)
            desired, reason = self._max_panic, "panic"
        else:
            desired, reason = desired_stable, "stable"

        desired = self._apply_scale_down_delay(now, desired)
        if desired == 0 and current_pods > 0 and now - self.last_active < sp.scale_to_zero_grace_s:
            desired, reason = 1, "scale-to-zero grace"
        return Decision(self._bound(desired), panic, stable, panic_val, reason, ebc)

    def _apply_scale_down_delay(self, now: float, desired: int) -> int:
        """The maximum of the decisions of the last `delay` seconds; one exactly `delay` old
        is dropped (max/window.go: out of date once index − its index ≥ size)."""
        delay = self.spec.scale_down_delay_s
        if delay <= 0:
            return desired
        self._recent.append((now, desired))
        while self._recent and self._recent[0][0] <= now - delay:
            self._recent.popleft()
        return max(d for _, d in self._recent)

    def _bound(self, desired: int) -> int:
        sp = self.spec
        desired = max(desired, sp.min_scale)
        if sp.max_scale:
            desired = min(desired, sp.max_scale)
        return desired
