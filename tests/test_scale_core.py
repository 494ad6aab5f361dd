"""What `scale` does with what it hears, with no NATS: activator reports become a desired
count, the plan starts or stops pods (which ones, and when not to), and pod events keep the
bookkeeping honest. Time is passed in; the metrics interval is one second throughout."""

from __future__ import annotations

import pytest

from functions.scale.core import BACKOFF_MAX_S, STALE_REPORTS, ServiceScaler, within_limit
from kernel.messages import Demand, PodEvent, PodState, ScalingSpec, ServiceSpec

INTERVAL = 1.0


def service(**knobs: object) -> ServiceSpec:
    """A service whose pods each take 10 × 0.7 = 7 concurrent requests."""
    return ServiceSpec(
        name="svc", command=["serve"], scaling=ScalingSpec(target_concurrency=10.0, **knobs)
    )


def demand(
    buffered: int, in_flight: int = 0, *, ts: float, reporter: str = "act-1", requests: int = 0
) -> Demand:
    return Demand(
        service="svc",
        reporter=reporter,
        buffered=buffered,
        in_flight=in_flight,
        requests=requests,
        ts=ts,
    )


def event(pod: str, state: PodState, node: str = "node-1", reason: str = "") -> PodEvent:
    return PodEvent(pod=pod, service="svc", node=node, state=state, reason=reason)


def scaler(**knobs: object) -> ServiceScaler:
    return ServiceScaler.for_spec(service(**knobs))


# ---- demand → pods -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting", "expected"), [(0, 0), (1, 1), (7, 1), (8, 2), (35, 5)], ids=lambda v: str(v)
)
def test_plan_starts_the_pods_the_demand_needs(waiting: int, expected: int) -> None:
    s = scaler()
    s.observe(demand(waiting, ts=0.0))

    plan = s.plan(0.0, INTERVAL)

    assert (plan.service, plan.desired, plan.start, plan.stop) == ("svc", expected, expected, [])


def test_pods_being_placed_are_not_asked_for_twice() -> None:
    s = scaler()
    s.observe(demand(35, ts=0.0))
    for i in range(s.plan(0.0, INTERVAL).start):
        s.placing(f"p{i}", 0.0)

    s.observe(demand(35, ts=0.5))
    plan = s.plan(0.5, INTERVAL)

    assert (plan.desired, plan.start, plan.stop) == (5, 0, [])
    assert s.counts() == (0, 5)


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([("act-1", 20, 0)], 20),
        ([("act-1", 20, 0), ("act-2", 10, 5)], 35),
        ([("act-1", 0, 3), ("act-2", 0, 4), ("act-3", 1, 0)], 8),
        ([("act-1", 20, 0), ("act-1", 2, 0)], 2),  # an activator's newer report replaces its own
    ],
    ids=["one", "two-summed", "three-summed", "newer-replaces"],
)
def test_reports_from_several_activators_are_summed(
    reports: list[tuple[str, int, int]], expected: float
) -> None:
    s = scaler()
    for name, buffered, in_flight in reports:
        s.observe(demand(buffered, in_flight, ts=0.0, reporter=name))

    assert s.concurrency(0.0, INTERVAL)[0] == expected


def test_rps_is_requests_per_interval_summed_over_activators() -> None:
    s = scaler()
    s.observe(demand(0, ts=0.0, reporter="act-1", requests=6))
    s.observe(demand(0, ts=0.0, reporter="act-2", requests=4))

    assert s.concurrency(0.0, 2.0) == (0.0, 5.0)


@pytest.mark.parametrize(
    ("age", "counted"),
    [(0.0, True), (2.9, True), (STALE_REPORTS, True), (3.1, False), (60.0, False)],
    ids=["fresh", "almost-stale", "at-the-limit", "stale", "long-gone"],
)
def test_stale_reports_are_ignored_and_forgotten(age: float, counted: bool) -> None:
    s = scaler()
    s.observe(demand(35, ts=0.0, reporter="dead-or-alive"))
    s.observe(demand(7, ts=age, reporter="alive"))

    conc, _ = s.concurrency(age, INTERVAL)

    assert conc == (42 if counted else 7)
    assert ("dead-or-alive" in s.reports) is counted


# ---- which pods stop -----------------------------------------------------------------------

# (pod, state, since); "placing" pods have no node yet
Pods = list[tuple[str, str, float]]


@pytest.mark.parametrize(
    ("pods", "max_scale", "victims"),
    [
        ([("a", "ready", 0), ("b", "ready", 10), ("c", "starting", 5)], 2, ["c"]),
        ([("a", "ready", 0), ("b", "ready", 10), ("c", "starting", 5)], 1, ["c", "b"]),
        ([("a", "ready", 0), ("b", "ready", 20), ("c", "ready", 10)], 1, ["b", "c"]),
        ([("s1", "starting", 5), ("s2", "starting", 8), ("a", "ready", 0)], 1, ["s2", "s1"]),
        ([("x", "placing", 15), ("a", "ready", 0), ("b", "ready", 10)], 2, ["b"]),
        ([("a", "ready", 20), ("u", "unready", 0), ("b", "ready", 10)], 2, ["u"]),
    ],
    ids=[
        "starting-before-ready",
        "then-youngest-ready",
        "youngest-ready-first",
        "youngest-starting-first",
        "placing-left-to-finish",
        "unready-before-ready",
    ],
)
def test_stopping_over_desired_picks_starting_then_youngest_ready(
    pods: Pods, max_scale: int, victims: list[str]
) -> None:
    s = scaler(max_scale=max_scale)
    for pod, state, since in pods:
        if state == "placing":
            s.placing(pod, since)
        else:
            s.on_pod_event(event(pod, state), since)
    s.observe(demand(100, ts=30.0))  # far more than max_scale pods' worth

    plan = s.plan(30.0, INTERVAL)

    assert plan.desired == max_scale
    assert [p.pod for p in plan.stop] == victims
    assert all(p.state == "terminating" and p.node == "node-1" for p in plan.stop)
    assert s.counts()[1] == len(pods) - len(victims)
    s.observe(demand(100, ts=31.0))
    assert s.plan(31.0, INTERVAL).stop == [], "a pod is stopped once"


def test_no_traffic_for_the_grace_stops_the_last_pod() -> None:
    s = scaler(stable_window_s=6.0, scale_to_zero_grace_s=30.0)
    s.observe(demand(1, ts=0.0))
    assert s.plan(0.0, INTERVAL).start == 1
    s.placing("p", 0.0)
    s.on_pod_event(event("p", "ready"), 1.0)

    stops = {}
    for t in range(1, 31):
        s.observe(demand(0, ts=float(t)))
        stops[t] = [p.pod for p in s.plan(float(t), INTERVAL).stop]

    assert all(stops[t] == [] for t in range(1, 30))
    assert stops[30] == ["p"]


def test_a_restarted_scale_gives_pods_it_finds_the_grace_before_stopping_them() -> None:
    """No traffic history (a restarted `scale`, adopted pods) is not "idle since forever"."""
    s = ServiceScaler.for_spec(service(stable_window_s=6.0, scale_to_zero_grace_s=30.0), 100.0)
    s.on_pod_event(event("adopted", "ready"), 100.0)
    stops = {}
    for t in range(101, 131):
        s.observe(demand(0, ts=float(t)))
        stops[t] = [p.pod for p in s.plan(float(t), INTERVAL).stop]
    assert all(stops[t] == [] for t in range(101, 130))
    assert stops[130] == ["adopted"]


def test_a_new_idle_service_gets_no_pod_during_the_grace() -> None:
    s = ServiceScaler.for_spec(service(scale_to_zero_grace_s=30.0), 0.0)
    for t in range(1, 10):
        assert s.plan(float(t), INTERVAL).start == 0


# ---- failures and backoff ------------------------------------------------------------------


def test_failed_pods_back_off_exponentially_and_no_pod_starts_meanwhile() -> None:
    s = scaler()
    now = 0.0
    for n, wait in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX_S, BACKOFF_MAX_S]):
        s.observe(demand(1, ts=now))
        assert s.plan(now, INTERVAL).start == 1, f"attempt {n}"
        s.placing(f"p{n}", now)
        s.on_pod_event(event(f"p{n}", "starting"), now)
        now += 0.5
        s.on_pod_event(event(f"p{n}", "failed", reason="exit status 1"), now)

        assert (s.backoff_s, s.last_error) == (wait, "exit status 1")
        s.observe(demand(1, ts=now + wait - 0.01))
        plan = s.plan(now + wait - 0.01, INTERVAL)
        assert (plan.desired, plan.start) == (1, 0), "a pod started during the backoff"
        now += wait


def test_a_ready_pod_resets_the_backoff() -> None:
    s = scaler()
    for n, t in enumerate([0.0, 2.0, 5.0]):
        s.on_pod_event(event(f"p{n}", "failed", reason="oom"), t)
    assert s.backoff_s == 4.0

    s.on_pod_event(event("p9", "ready"), 20.0)
    assert (s.backoff_s, s.last_error) == (0.0, "")
    s.on_pod_event(event("p8", "failed", reason="oom"), 21.0)

    assert s.backoff_until == 22.0


def test_a_placement_failure_backs_off_like_a_failed_pod() -> None:
    s = scaler()
    s.placing("p", 0.0)

    s.placement_failed("p", "no node has 4 cpu free", 1.0)

    assert (s.pods, s.backoff_until, s.last_error) == ({}, 2.0, "no node has 4 cpu free")


# ---- pod bookkeeping -----------------------------------------------------------------------


def test_a_late_ready_does_not_resurrect_a_terminating_pod() -> None:
    s = scaler()
    s.on_pod_event(event("a", "ready"), 0.0)
    s.on_pod_event(event("a", "terminating"), 1.0)

    s.on_pod_event(event("a", "ready"), 2.0)

    assert s.pods["a"].state == "terminating"
    assert s.counts() == (0, 0)
    s.on_pod_event(event("a", "stopped"), 3.0)
    assert "a" not in s.pods


def test_placed_records_the_node_of_a_pod_being_placed() -> None:
    s = scaler()
    s.placing("p", 0.0)

    s.placed("p", "node-7")
    s.placed("unknown", "node-7")

    assert (s.pods["p"].state, s.pods["p"].node) == ("placing", "node-7")
    assert "unknown" not in s.pods


def test_update_spec_reaches_the_autoscaler() -> None:
    s = scaler()
    new = ServiceSpec(
        name="svc",
        command=["serve"],
        scaling=ScalingSpec(target_concurrency=50.0),
        container_concurrency=4,
    )

    s.update_spec(new)

    assert (s.autoscaler.spec, s.autoscaler.container_concurrency) == (new.scaling, 4)
    assert s.autoscaler.target == pytest.approx(4 * 0.7)


# ---- the cluster's max-scale limit ---------------------------------------------------------


@pytest.mark.parametrize(
    ("max_scale", "limit", "bound"),
    [(0, 100, 100), (500, 100, 100), (20, 100, 20), (0, 0, 0), (500, 0, 500)],
    ids=["unbounded-gets-the-limit", "over-the-limit", "under-the-limit", "no-limit",
         "no-limit-keeps-its-own"],
)
def test_a_runaway_demand_is_held_to_max_scale_and_the_limit(
    max_scale: int, limit: int, bound: int
) -> None:
    """A forged or buggy report of 100,000 waiting requests must not take the cluster."""
    s = ServiceScaler.for_spec(within_limit(service(max_scale=max_scale), limit))
    s.observe(demand(100_000, ts=0.0))

    plan = s.plan(0.0, INTERVAL)

    assert plan.desired == (bound or 100_000 // 7 + 1)


# ---- ready ↔ unready (issue 14) ------------------------------------------------------------

# (events in order, as (pod, state); expected (ready, current) and pods started for the
# demand of two pods' worth)
FLAPS = [
    ([("a", "ready"), ("b", "ready")], (2, 2), 0),
    ([("a", "ready"), ("b", "ready"), ("b", "unready")], (1, 2), 0),
    ([("a", "ready"), ("b", "ready"), ("a", "unready"), ("b", "unready")], (0, 2), 0),
    ([("a", "ready"), ("b", "ready"), ("b", "unready"), ("b", "ready")], (2, 2), 0),
    # Gone is gone: that one is replaced.
    ([("a", "ready"), ("b", "ready"), ("b", "unready"), ("b", "failed")], (1, 1), 1),
]


@pytest.mark.parametrize(("events", "counts", "started"), FLAPS,
                         ids=["both-ready", "one-flapped", "both-flapped", "flapped-back",
                              "flapped-then-died"])
def test_an_unready_pod_still_counts_and_is_not_replaced(
    events: list[tuple[str, PodState]], counts: tuple[int, int], started: int
) -> None:
    """Knative counts a not-ready pod as pending, not gone: an unready pod stops counting as
    ready capacity but is not replaced because it flapped."""
    s = scaler(stable_window_s=6.0)
    for n, (pod, state) in enumerate(events):
        s.on_pod_event(event(pod, state), float(n))
    s.observe(demand(0, 14, ts=10.0))  # two pods' worth (7 each) in flight

    plan = s.plan(10.0, INTERVAL)

    assert s.counts() == counts
    assert (plan.desired, plan.start, plan.stop) == (2, started, [])
    assert s.backoff_s == (1.0 if events[-1][1] == "failed" else 0.0)
