"""Knative parity, one case per difference issue 16 found: each states the value Knative's
autoscaler gives and the line of knative/serving (commit 98e5ef90) it follows, so a change
in `kpa.py` that drifts from Knative fails here with the reason. Files cited:

- AS = pkg/autoscaler/scaling/autoscaler.go (`newAutoscaler`, `Scale`), its tests in
  autoscaler_test.go;
- TW = pkg/autoscaler/aggregation/max/window.go (the scale-down delay window);
- RT = pkg/reconciler/autoscaling/resources/target.go (`ResolveMetricTarget`).

Samples go in with their time; no clock, no sleep."""

from __future__ import annotations

import pytest

from controlplane.cli import build_parser, spec_from_flags
from controlplane.specfile import spec_from_manifest
from functions.scale.core import ServiceScaler
from functions.scale.kpa import Autoscaler, Decision, excess_burst_capacity, resolve_target
from kernel.messages import Demand, PodEvent, ScalingSpec, ServiceSpec, SpecError

# Knative's unit tests use a target value of 10 with no utilization; so do these.
TARGET_10 = {"target_concurrency": 10.0, "target_utilization": 1.0}


def autoscaler(cc: int = 0, *, start_ready: int = 1, **knobs: object) -> Autoscaler:
    a = Autoscaler(ScalingSpec(**{**TARGET_10, **knobs}), container_concurrency=cc)
    a.adopt(0.0, start_ready)
    return a


def decide(a: Autoscaler, now: float, ready: int, current: int | None = None) -> Decision:
    d = a.scale(now, ready, ready if current is None else current)
    assert d is not None
    return d


# ---- 1. the scale-down delay drops a decision exactly `delay` old --------------------------


def test_scale_down_delay_drops_a_decision_exactly_the_delay_old() -> None:
    """AS_test TestAutoscalerScaleDownDelay "simple": 40 at t=2 → 4; at 5 min still 4; at
    5 min 2 s → 0. TW Record: an entry is out once index − its index >= size."""
    a = autoscaler(start_ready=0, scale_down_delay_s=300.0, max_scale_down_rate=10.0,
                   max_scale_up_rate=10.0, panic_threshold_pct=10_000.0,
                   scale_to_zero_grace_s=0.0)
    a.record(2.0, 40)
    assert decide(a, 2.0, ready=0, current=1).desired == 4
    a.record(300.0, 0)
    assert decide(a, 300.0, ready=0, current=4).desired == 4
    a.record(302.0, 0)
    assert decide(a, 302.0, ready=0, current=4).desired == 0  # fnplane said 4: a tick late


# ---- 2, 7, 9. targets and excess burst capacity ---------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "cc", "expected"),
    [
        ({}, 200, (140.0, 200.0)),  # RT: total = ContainerConcurrency; fnplane said 70
        ({}, 0, (70.0, 100.0)),  # RT: "If containerConcurrency is 0 we'll always target
                                 # the default" (100)
        ({"target_concurrency": 100.0}, 200, (70.0, 100.0)),  # RT: the annotation target
        ({"target_concurrency": 100.0}, 50, (35.0, 50.0)),  # RT: math.Min(target, cc)
        ({"metric": "rps"}, 4, (140.0, 200.0)),  # RT: RPS total = rps target, cc ignored
        ({"metric": "rps", "target_rps": 10.0}, 0, (7.0, 10.0)),
    ],
    ids=["cc-no-target", "no-cc-no-target", "target-below-cc", "cc-below-target", "rps",
         "rps-target"],
)
def test_target_and_total_resolve_as_knative(
    knobs: dict[str, object], cc: int, expected: tuple[float, float]
) -> None:
    spec = ScalingSpec(**knobs)  # type: ignore[arg-type]
    target, total = resolve_target(spec, cc)
    assert (target, total) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("knobs", "cc", "ready", "panic_value", "expected"),
    [
        # 2. AS "totCap := originalReadyPodsCount * spec.TotalValue": RPS total is the RPS
        # target, 2 × 200 − 211 − 100 = 89 (fnplane said −111, proxy mode).
        ({"metric": "rps", "target_rps": 200.0}, 0, 2, 100.0, 89.0),
        # 7. An explicit target below cc: total is the target, 2 × 100 − 50 − 20 = 130
        # (fnplane used cc: 330).
        ({"target_concurrency": 100.0, "target_burst_capacity": 50.0}, 200, 2, 20.0, 130.0),
        ({"target_burst_capacity": 50.0}, 200, 2, 20.0, 330.0),  # no target: total = cc
        # 9. No ready pod: AS's switch on TargetBurstCapacity still decides (fnplane: −1).
        ({"target_burst_capacity": 0.0}, 0, 0, 5.0, 0.0),  # "== 0: excessBCF = 0"
        ({"target_burst_capacity": -1.0}, 0, 0, 5.0, -1.0),  # "excessBCF := -1."
        ({"target_burst_capacity": 211.0}, 0, 0, 5.0, -216.0),  # floor(0 − 211 − 5)
        ({"target_burst_capacity": 211.0}, 10, 30, 5.0, 84.0),  # floor(300 − 211 − 5)
    ],
    ids=["rps-total", "target-below-cc", "cc-total", "zero-ready-tbc-0",
         "zero-ready-tbc-minus-1", "zero-ready-tbc-211", "thirty-ready"],
)
def test_excess_burst_capacity_as_knative(
    knobs: dict[str, object], cc: int, ready: int, panic_value: float, expected: float
) -> None:
    spec = ScalingSpec(**knobs)  # type: ignore[arg-type]
    assert excess_burst_capacity(spec, cc, ready, panic_value) == expected


def test_rps_mode_goes_direct_with_spare_rps_capacity() -> None:
    """Item 2 through a decision: 2 pods at 100 RPS with the 200 RPS target → EBC 89."""
    a = autoscaler(metric="rps", target_rps=200.0, target_utilization=0.7,
                   target_burst_capacity=211.0)
    for t in range(0, 61):
        a.record(float(t), 1, 100.0)
    d = decide(a, 60.0, ready=2)
    assert (d.desired, d.excess_burst_capacity, d.mode) == (1, 89.0, "direct")


def test_at_zero_desired_the_activator_is_in_the_path_whatever_the_ebc() -> None:
    """pkg/reconciler/autoscaling/kpa/kpa.go: proxy mode when want == 0 or EBC < 0."""
    assert Decision(0, False, 0.0, 0.0, "stable", 0.0).mode == "proxy"
    assert Decision(1, False, 0.0, 0.0, "stable", 0.0).mode == "direct"


# ---- 3, 4, 5. the panic test, and its end --------------------------------------------------


@pytest.mark.parametrize(
    ("ready", "current", "in_flight", "panic"),
    [
        # 3. AS "dppc := math.Ceil(observedPanicValue / spec.TargetValue)" then
        # "isOverPanicThreshold := dppc/readyPodsCount >= spec.PanicThreshold": ceil(15/10)
        # = 2 ≥ 1 × 2 (fnplane compared 1.5).
        (1, 1, 15.0, True),
        (1, 1, 10.0, False),  # ceil(1.0) = 1 < 2
        # 4. AS "readyPodsCount := math.Max(1, float64(originalReadyPodsCount))": no pod
        # ready yet (one starting) counts as one (fnplane could not panic there).
        (0, 1, 15.0, True),
        (0, 1, 10.0, False),
    ],
    ids=["rounded-up-panics", "at-target-no-panic", "zero-ready-counts-as-one",
         "zero-ready-below"],
)
def test_panic_threshold_as_knative(ready: int, current: int, in_flight: float,
                                    panic: bool) -> None:
    a = autoscaler(stable_window_s=60.0)
    a.record(0.0, in_flight)
    assert decide(a, 0.0, ready=ready, current=current).panic is panic


def test_panic_ends_only_strictly_after_a_stable_window() -> None:
    """5. AS: un-panic when "a.panicTime.Add(spec.StableWindow).Before(now)"; AS_test
    TestAutoscalerPanicThenUnPanicScaleDown scales down at panic time + 61 s, not 60."""
    a = autoscaler(stable_window_s=6.0)
    a.record(0.0, 100)
    assert (d := decide(a, 0.0, ready=1)).panic and d.desired == 10
    for t in range(1, 8):
        a.record(float(t), 0)
    assert decide(a, 6.0, ready=10).panic, "exactly panic time + window: still panicking"
    d = decide(a, 7.0, ready=10)
    assert (d.panic, d.desired) == (False, 5)  # then stable, 10 ready / scale-down rate 2


# ---- 6. starting in panic --------------------------------------------------------------------


@pytest.mark.parametrize(("ready", "panic"), [(0, False), (1, False), (2, True), (10, True)])
def test_an_autoscaler_adopting_more_than_one_ready_pod_starts_in_panic(
    ready: int, panic: bool
) -> None:
    """AS newAutoscaler: "if curC > 1 { pt = time.Now() }", maxPanicPods = curC (AS_test
    TestStartInPanicMode: not at 0 or 1, at 2)."""
    a = autoscaler(start_ready=ready)
    a.record(1.0, 0)
    d = decide(a, 1.0, ready=ready)
    assert d.panic is panic
    assert d.desired == (ready if panic else 0)


def test_a_restarted_scale_holds_the_adopted_pods_a_stable_window_then_scales_down() -> None:
    """The issue's case through the core: a `scale` restarted at t=100 adopts 10 ready pods
    and hears no demand. Knative holds 10 through panic time + the window, then halves
    (max scale-down rate 2); fnplane asked for 5 at once."""
    spec = ServiceSpec(name="svc", command=["serve"],
                       scaling=ScalingSpec(stable_window_s=6.0, scale_to_zero_grace_s=0.0))
    s = ServiceScaler.for_spec(spec, 100.0)
    for i in range(10):
        s.on_pod_event(PodEvent(pod=f"p{i}", service="svc", node="n", state="ready"), 100.0)
    desired = {}
    for t in range(100, 108):
        s.observe(Demand(service="svc", reporter="act", buffered=0, in_flight=0,
                         requests=0, ts=float(t)))
        plan = s.plan(float(t), 1.0)
        desired[t] = plan.desired
    assert [desired[t] for t in range(100, 107)] == [10] * 7
    assert desired[107] == 5


# ---- 8. activation-scale -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stable", "expected"),
    [(0.0, 0), (1.0, 2), (25.0, 3)],
    ids=["no-demand-zero", "some-demand-activation-scale", "more-demand-more-pods"],
)
def test_activation_scale_is_the_fewest_pods_under_demand(stable: float, expected: int) -> None:
    """AS "If ActivationScale > 1": dspc > 0 lifts the stable count to it (AS_test
    TestAutoscalerActivationScale: 0 with no traffic, 2 with 1 request)."""
    a = autoscaler(activation_scale=2, scale_to_zero_grace_s=0.0)
    for t in range(0, 61):
        a.record(float(t), stable)
    assert decide(a, 60.0, ready=1).desired == expected


def test_activation_scale_from_zero_starts_that_many_at_once() -> None:
    a = autoscaler(start_ready=0, activation_scale=3)
    a.record(0.0, 1)
    d = decide(a, 0.0, ready=0, current=0)
    assert (d.desired, d.reason) == (3, "activation")


@pytest.mark.parametrize(
    ("knobs", "error"),
    [
        ({"activation_scale": 1}, "activation-scale must be >= 2"),
        ({"activation_scale": 2, "min_scale": 3}, "min-scale 3 > activation-scale 2"),
        ({"activation_scale": 5, "max_scale": 4}, "max-scale 4 < activation-scale 5"),
    ],
)
def test_activation_scale_is_validated_as_knative(knobs: dict[str, object], error: str) -> None:
    """pkg/apis/autoscaling/annotation_validation.go validateMinMaxScale."""
    spec = ServiceSpec(name="svc", command=["serve"], scaling=ScalingSpec(**knobs))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=error):
        spec.validate()


def test_activation_scale_and_no_target_from_the_cli_and_the_manifest() -> None:
    """`fnplane deploy --activation-scale N` and `activationScale` in an FnService; with no
    target declared the spec says so (None), so Knative's resolution applies."""
    args = build_parser().parse_args(["deploy", "llm", "--activation-scale", "3",
                                      "--container-concurrency", "200"])
    spec = spec_from_flags(args).validate()
    assert (spec.scaling.activation_scale, spec.scaling.target_concurrency) == (3, None)
    assert resolve_target(spec.scaling, spec.container_concurrency)[0] == pytest.approx(140.0)
    doc = {"apiVersion": "fnplane.dev/v1alpha1", "kind": "FnService",
           "metadata": {"name": "llm"},
           "spec": {"predictor": {"minReplicas": 0, "activationScale": 2,
                                  "containerConcurrency": 200}}}
    sc = spec_from_manifest(doc).validate().scaling
    assert (sc.activation_scale, sc.target_concurrency) == (2, None)
