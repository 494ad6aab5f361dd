"""The KPA decision, case by case as knative/serving's autoscaler_test.go states it: samples
go in with the time they were taken, `scale(now, ready, current)` answers; no clock, no sleep.

Unless a case says otherwise the per-pod target is 10 × 0.7 = 7 concurrent requests, so the
numbers can be checked by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions.scale.kpa import Autoscaler, Decision
from kernel.messages import ScalingSpec

TARGET_10 = {"target_concurrency": 10.0}


def autoscaler(cc: int = 0, *, start_ready: int = 1, **knobs: object) -> Autoscaler:
    """Built at t=0 with `start_ready` ready pods; 1, as Knative's newTestAutoscaler, so it
    does not start in panic."""
    a = Autoscaler(ScalingSpec(**{**TARGET_10, **knobs}), container_concurrency=cc)
    a.adopt(0.0, start_ready)
    return a


def steady(a: Autoscaler, value: float, start: float, end: float, *, rps: float = 0.0) -> None:
    """One sample a second over [start, end]."""
    for t in range(int(start), int(end) + 1):
        a.record(float(t), value, rps)


def decide(a: Autoscaler, now: float, ready: int, current: int | None = None) -> Decision:
    d = a.scale(now, ready, ready if current is None else current)
    assert d is not None
    return d


@dataclass(frozen=True)
class Phase:
    """From `start` to `end` (inclusive, one tick a second): this concurrency, this many
    ready pods; the autoscaler decides every tick."""

    start: int
    end: int
    concurrency: float
    ready: int


def run(a: Autoscaler, *phases: Phase) -> dict[int, Decision]:
    out: dict[int, Decision] = {}
    for ph in phases:
        for t in range(ph.start, ph.end + 1):
            a.record(float(t), ph.concurrency)
            out[t] = decide(a, float(t), ph.ready)
    return out


# ---- no data, activation -------------------------------------------------------------------


def test_no_samples_no_decision() -> None:
    assert autoscaler().scale(100.0, 0, 0) is None
    assert autoscaler().scale(100.0, 3, 3) is None, "pods but no sample: still no decision"


@pytest.mark.parametrize(
    ("knobs", "cc", "waiting", "expected"),
    [
        ({}, 0, 1, 1),
        ({"initial_scale": 3}, 0, 1, 3),
        ({"initial_scale": 0}, 0, 1, 1),
        ({}, 0, 35, 5),  # ceil(35 / 7)
        ({"max_scale": 3}, 0, 35, 3),
        ({"min_scale": 2}, 0, 1, 2),
        ({"target_concurrency": 100.0}, 1, 3, 5),  # cc 1 caps the target: ceil(3 / 0.7)
    ],
    ids=[
        "one-request-one-pod",
        "initial-scale",
        "initial-scale-zero-still-starts-one",
        "demand-above-initial-scale",
        "capped-by-max-scale",
        "min-scale-above-need",
        "container-concurrency-caps-target",
    ],
)
def test_activation_from_zero_answers_at_once(
    knobs: dict[str, object], cc: int, waiting: float, expected: int
) -> None:
    a = autoscaler(cc, **knobs)
    a.record(0.0, waiting)

    d = decide(a, 0.0, ready=0, current=0)

    assert (d.desired, d.reason, d.panic) == (expected, "activation", False)


def test_no_second_activation_while_a_pod_is_coming() -> None:
    a = autoscaler()
    a.record(0.0, 1)

    d = decide(a, 0.5, ready=0, current=1)

    assert d.reason != "activation"
    assert d.desired == 1


def test_nobody_waiting_at_zero_is_no_activation() -> None:
    a = autoscaler()
    a.record(0.0, 0)

    assert decide(a, 0.0, ready=0, current=0).desired == 0


# ---- the stable window ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "cc", "concurrency", "expected"),
    [
        ({}, 0, 35, 5),  # ceil(35 / (10 × 0.7))
        ({}, 0, 36, 6),
        ({"target_concurrency": 100.0}, 0, 140, 2),  # Knative's defaults: 100 × 0.7
        ({"target_utilization": 1.0}, 0, 35, 4),  # ceil(35 / 10)
        ({}, 5, 35, 10),  # container concurrency 5 caps the target: 35 / 3.5
        ({}, 50, 35, 5),  # a container concurrency above the target does not raise it
    ],
    ids=["35-over-7", "36-over-7", "knative-defaults", "full-utilization", "cc-caps", "cc-above"],
)
def test_stable_window_average_over_target(
    knobs: dict[str, object], cc: int, concurrency: float, expected: int
) -> None:
    a = autoscaler(cc, **knobs)
    steady(a, concurrency, 0, 60)

    d = decide(a, 60.0, ready=expected)

    assert (d.desired, d.panic, d.reason) == (expected, False, "stable")
    assert d.stable_value == pytest.approx(concurrency)


def test_stable_value_is_the_average_over_the_window_only() -> None:
    a = autoscaler()
    steady(a, 700, 0, 59)  # older than the 60 s window at t=120: forgotten
    steady(a, 14, 60, 120)

    d = decide(a, 120.0, ready=2)

    assert (d.stable_value, d.desired) == (14, 2)


# ---- panic ---------------------------------------------------------------------------------

BURST = (Phase(0, 59, 14, 2), Phase(60, 65, 70, 2))  # 2 pods at target, then 5 × target


def test_panic_starts_when_the_panic_window_doubles_the_target() -> None:
    d = run(autoscaler(), *BURST)

    assert (d[59].panic, d[59].desired) == (False, 2)
    # At 60 the 6 s panic window averages (5 × 14 + 70) / 6 = 23.3, 3.3 pods' worth: Knative
    # rounds it up to 4 before comparing with 2 ready × 200% (autoscaler.go: dppc, then
    # isOverPanicThreshold := dppc/readyPodsCount >= PanicThreshold), so it panics at once.
    assert (d[59].panic, d[60].panic) == (False, True)
    assert (d[65].panic, d[65].desired, d[65].reason) == (True, 10, "panic")  # ceil(70 / 7)


def test_panic_never_scales_down_and_ends_a_stable_window_after_the_surge() -> None:
    d = run(autoscaler(), *BURST, Phase(66, 200, 14, 10))

    during = [d[t].desired for t in range(61, 125)]
    assert during == sorted(during), "decisions fell while panicking"
    assert all(d[t].panic and d[t].desired == 10 for t in range(65, 125))
    # Last over the threshold at 65: panic holds through 65 + 60 (Knative un-panics only when
    # panicTime.Add(StableWindow).Before(now)), then the stable window rules, limited by the
    # scale-down rate (10 ready / 2).
    assert (d[125].panic, d[125].desired) == (True, 10)
    assert (d[126].panic, d[126].reason, d[126].desired) == (False, "stable", 5)


def test_entering_panic_never_asks_for_fewer_pods_than_the_stable_window() -> None:
    # 29 pods served 200 steadily; most are lost at once and demand falls to 50: the panic
    # window is over the threshold for 3 pods, but the stable window still wants ~28.
    d = run(autoscaler(), Phase(0, 59, 200, 29), Phase(60, 65, 50, 3))

    assert (d[59].panic, d[59].desired) == (False, 29)
    for t in range(60, 66):
        assert d[t].panic
        assert d[t].desired >= max(29, math.ceil(d[t].stable_value / 7)), t


def test_at_zero_the_activation_answers_not_the_panic() -> None:
    """No pod at all and requests waiting: the scale-from-zero path decides (with pods
    starting but none ready, Knative's panic rules apply: test_kpa_parity.py)."""
    d = run(autoscaler(), Phase(0, 10, 700, 0))

    assert all(x.reason == "activation" and not x.panic for x in d.values())


# ---- rates and bounds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "ready", "expected"),
    [(2.0, 1, 2), (2.0, 3, 6), (1.5, 1, 2), (1000.0, 1, 10)],
    ids=["doubles-one-pod", "doubles-three", "at-least-one-more", "default-rate-unbounded"],
)
def test_max_scale_up_rate(rate: float, ready: int, expected: int) -> None:
    a = autoscaler(max_scale_up_rate=rate)
    steady(a, 70, 0, 60)  # needs 10

    assert decide(a, 60.0, ready=ready).desired == expected


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(2.0, 5), (4.0, 2), (20.0, 1)],
    ids=["halves", "quarters", "no-limit-left"],
)
def test_max_scale_down_rate(rate: float, expected: int) -> None:
    a = autoscaler(max_scale_down_rate=rate)
    steady(a, 7, 0, 60)  # needs 1, 10 are ready

    assert decide(a, 60.0, ready=10).desired == expected


@pytest.mark.parametrize(
    ("knobs", "concurrency", "expected"),
    [
        ({"min_scale": 8}, 35, 8),
        ({"max_scale": 3}, 35, 3),
        ({"max_scale": 0}, 35, 5),  # 0 = unbounded, as Knative
        ({"min_scale": 2}, 0, 2),  # idle long past the grace: min scale still holds
    ],
    ids=["min-scale", "max-scale", "max-scale-zero-is-unbounded", "min-scale-when-idle"],
)
def test_min_and_max_scale_bound_every_decision(
    knobs: dict[str, object], concurrency: float, expected: int
) -> None:
    a = autoscaler(**knobs)
    steady(a, concurrency, 0, 120)

    assert decide(a, 120.0, ready=5).desired == expected


# ---- scale-down delay and scale to zero ----------------------------------------------------


def test_scale_down_delay_keeps_the_max_of_the_decisions_in_the_delay() -> None:
    knobs = {"stable_window_s": 6.0, "max_scale_down_rate": 100.0}
    phases = (Phase(0, 5, 70, 10), Phase(6, 60, 7, 10))
    prompt = run(autoscaler(**knobs), *phases)
    delayed = run(autoscaler(scale_down_delay_s=30.0, **knobs), *phases)

    for t in delayed:
        # A decision exactly 30 s old has left the window (max/window.go).
        window = [prompt[s].desired for s in range(max(0, t - 29), t + 1)]
        assert delayed[t].desired == max(window), t
    # The 10 decided at t=5 holds through t=34 and is gone at t=35, exactly 30 s later.
    assert (prompt[20].desired, delayed[34].desired, delayed[35].desired,
            delayed[60].desired) == (1, 10, 9, 1)


@pytest.mark.parametrize(
    ("grace", "t", "expected"),
    [(30.0, 10, 1), (30.0, 29, 1), (30.0, 30, 0), (30.0, 90, 0), (0.0, 10, 0)],
    ids=["within-grace", "just-before", "at-grace", "long-after", "no-grace"],
)
def test_scale_to_zero_waits_for_the_grace_after_the_last_request(
    grace: float, t: int, expected: int
) -> None:
    a = autoscaler(stable_window_s=6.0, scale_to_zero_grace_s=grace)
    a.record(0.0, 1)  # the last request
    assert decide(a, 0.0, ready=0, current=0).desired == 1
    for s in range(1, t + 1):
        a.record(float(s), 0)

    d = decide(a, float(t), ready=1)

    assert d.desired == expected
    if expected == 1:
        assert d.reason == "scale-to-zero grace"


def test_a_new_request_restarts_the_grace() -> None:
    a = autoscaler(stable_window_s=6.0, scale_to_zero_grace_s=30.0)
    steady(a, 1, 0, 0)
    steady(a, 0, 1, 19)
    steady(a, 1, 20, 20)
    steady(a, 0, 21, 60)

    assert [decide(a, t, ready=1).desired for t in (40.0, 49.0, 50.0)] == [1, 1, 0]


# ---- the RPS metric ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cc", "rps", "expected"),
    [(0, 35, 5), (1, 35, 5), (0, 0.5, 1)],
    ids=["rps-over-target", "container-concurrency-does-not-cap-rps", "a-trickle-needs-one"],
)
def test_rps_mode_scales_on_requests_per_second(cc: int, rps: float, expected: int) -> None:
    a = autoscaler(cc, metric="rps", target_rps=10.0)  # 7 rps per pod
    steady(a, 0, 0, 60, rps=rps)

    d = decide(a, 60.0, ready=expected)

    assert (d.desired, d.stable_value) == (expected, pytest.approx(rps))


def test_rps_mode_activation_uses_the_rate() -> None:
    a = autoscaler(metric="rps", target_rps=10.0)
    a.record(0.0, 1, 35)

    assert decide(a, 0.0, ready=0, current=0).desired == 5


# ---- invariants ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    series=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 30)), min_size=1, max_size=80),
    min_scale=st.integers(0, 3),
    max_scale=st.integers(0, 25),
)
def test_every_decision_is_within_min_and_max_and_panic_never_lowers_it(
    series: list[tuple[int, int]], min_scale: int, max_scale: int
) -> None:
    """Random demand and ready pods, one tick a second."""
    if max_scale:
        min_scale = min(min_scale, max_scale)
    a = autoscaler(min_scale=min_scale, max_scale=max_scale, stable_window_s=10.0)
    previous: Decision | None = None
    for t, (concurrency, ready) in enumerate(series):
        a.record(float(t), concurrency)
        d = decide(a, float(t), ready=ready)
        assert d.desired >= min_scale
        if max_scale:
            assert d.desired <= max_scale
        if previous is not None and previous.panic and d.panic:
            assert d.desired >= previous.desired, "scaled down while panicking"
        previous = d
