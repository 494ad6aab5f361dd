"""The autoscaling decision, as Knative's KPA makes it, with no I/O and no clock of its own.

`Autoscaler.scale(now, ready_pods)` reads the concurrency (or RPS) samples recorded for one
service and returns the desired pod count, or `None` when it has never seen a sample (an
explicit "no decision", as knative/serving pkg/autoscaler/scaling/autoscaler.go).

Same knobs and meaning as Knative: the stable window average drives normal scaling; the
panic window (a percentage of the stable one) takes over when demand exceeds the panic
threshold, and in panic we never scale down; scale-up/down rates bound each step; a
scale-down delay keeps the maximum of recent decisions; going to zero waits for the
scale-to-zero grace after the last activity. One deliberate addition: when the service has
no pod and a request is waiting, the decision is at once max(1, initial scale, need) instead
of waiting for a window to fill — that is the scale-from-zero path.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from kernel.messages import ScalingSpec


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
        """Knative's rule: gateways may bypass the activator only with spare capacity."""
        return "direct" if self.excess_burst_capacity >= 0 else "proxy"


def excess_burst_capacity(
    spec: ScalingSpec, container_concurrency: int, ready_pods: int, panic_value: float
) -> float:
    """EBC = ready pods × per-pod capacity − target burst capacity − observed concurrency
    (knative/serving autoscaler.go). TBC −1: the activator stays in the path; 0: it leaves
    as soon as one pod is ready. Per-pod capacity is the container concurrency, or the
    concurrency target when the service declares none."""
    if ready_pods <= 0 or spec.target_burst_capacity < 0:
        return -1.0
    if spec.target_burst_capacity == 0:
        return 0.0
    per_pod = container_concurrency if container_concurrency > 0 else spec.target_concurrency
    return math.floor(ready_pods * per_pod - spec.target_burst_capacity - panic_value)


@dataclass
class Autoscaler:
    """Per-service scaler state; owned by one `scale` instance."""

    spec: ScalingSpec
    container_concurrency: int = 0
    _samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    _recent: deque[tuple[float, int]] = field(default_factory=deque)
    _panic_until: float = 0.0
    _panic_desired: int = 0
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
        """Per-pod target: Knative's container-concurrency-target × utilization, where a
        declared container concurrency caps the target (a pod cannot take more)."""
        if self.spec.metric == "rps":
            return max(self.spec.target_rps * self.spec.target_utilization, 0.01)
        base = self.spec.target_concurrency
        if self.container_concurrency > 0:
            base = min(base, self.container_concurrency)
        return max(base * self.spec.target_utilization, 0.01)

    def _average(self, now: float, window_s: float) -> float | None:
        col = 2 if self.spec.metric == "rps" else 1
        values = [s[col] for s in self._samples if s[0] > now - window_s]
        return sum(values) / len(values) if values else None

    def _latest(self) -> float:
        if not self._samples:
            return 0.0
        return self._samples[-1][2 if self.spec.metric == "rps" else 1]

    def scale(self, now: float, ready_pods: int, current_pods: int) -> Decision | None:
        """Desired pods for `now`; `current_pods` counts pods starting or ready."""
        sp = self.spec
        if not self._seen_any:
            return None
        stable = self._average(now, sp.stable_window_s) or 0.0
        panic_window = sp.stable_window_s * sp.panic_window_pct / 100.0
        panic_val = self._average(now, panic_window) or 0.0
        target = self.target

        # Scale from zero: someone is waiting and nothing is coming. Answer at once.
        latest = self._latest()
        if current_pods == 0 and latest > 0:
            want = max(1, sp.initial_scale, math.ceil(latest / target))
            return Decision(self._bound(want), False, stable, panic_val, "activation")

        base = max(ready_pods, 1)
        max_up = math.ceil(sp.max_scale_up_rate * base)
        max_down = math.floor(base / sp.max_scale_down_rate)
        desired_stable = min(max(math.ceil(stable / target), max_down), max_up)
        desired_panic = min(max(math.ceil(panic_val / target), max_down), max_up)

        over_threshold = panic_val / target / base >= sp.panic_threshold_pct / 100.0
        if over_threshold and ready_pods > 0:
            if self._panic_until <= now:
                self._panic_desired = ready_pods
            self._panic_until = now + sp.stable_window_s
        panic = self._panic_until > now
        if panic:
            # In panic we never scale down: hold the highest count seen since it began, and
            # provision for the stable window too when it is the larger (as Knative).
            self._panic_desired = max(self._panic_desired, desired_panic, desired_stable)
            desired, reason = self._panic_desired, "panic"
        else:
            self._panic_desired = 0
            desired, reason = desired_stable, "stable"

        desired = self._apply_scale_down_delay(now, desired)
        if desired == 0 and current_pods > 0 and now - self.last_active < sp.scale_to_zero_grace_s:
            desired, reason = 1, "scale-to-zero grace"
        ebc = excess_burst_capacity(sp, self.container_concurrency, ready_pods, panic_val)
        return Decision(self._bound(desired), panic, stable, panic_val, reason, ebc)

    def _apply_scale_down_delay(self, now: float, desired: int) -> int:
        delay = self.spec.scale_down_delay_s
        if delay <= 0:
            return desired
        self._recent.append((now, desired))
        while self._recent and self._recent[0][0] < now - delay:
            self._recent.popleft()
        return max(d for _, d in self._recent)

    def _bound(self, desired: int) -> int:
        sp = self.spec
        desired = max(desired, sp.min_scale)
        if sp.max_scale:
            desired = min(desired, sp.max_scale)
        return desired
