"""Readiness after start-up, the pure parts (issue 14): the probe's thresholds as a kubelet
counts them, which Node conditions take a node's pods out of traffic, and the probe a Pod
manifest carries. No NATS, no processes."""

from __future__ import annotations

import pytest

from kernel.messages import SpecError, StartPod
from partitions.agents.kubernetes import objects as ko
from partitions.agents.readiness import ReadinessProbe
from tests.kubelet import node
from tests.stackutil import sample_spec

# (failure threshold, probe outcomes, the transitions reported in order)
PROBES = [
    (3, [True, True, True], []),
    (3, [False, False, True, False, False], []),  # never 3 in a row
    (3, [False, False, False], ["unready"]),
    (3, [False, False, False, False, False], ["unready"]),  # said once
    (3, [False, False, False, True], ["unready", "ready"]),  # back at the first success
    (1, [False, True, False, True], ["unready", "ready", "unready", "ready"]),
    (2, [False, True, False, False, True, True], ["unready", "ready"]),
]


@pytest.mark.parametrize(("threshold", "outcomes", "transitions"), PROBES,
                         ids=["healthy", "blips", "three-failures", "said-once", "recovers",
                              "threshold-one", "streak-resets"])
def test_the_probe_flips_after_threshold_failures_and_back_at_one_success(
    threshold: int, outcomes: list[bool], transitions: list[str]
) -> None:
    probe = ReadinessProbe(threshold)

    seen = [t for ok in outcomes if (t := probe.observe(ok)) is not None]

    assert seen == transitions


@pytest.mark.parametrize(("conditions", "down"), [
    ([{"type": "Ready", "status": "True"}], ""),
    ([{"type": "Ready", "status": "False"}], "node n is not Ready (Ready=False)"),
    ([{"type": "Ready", "status": "Unknown"}], "node n is not Ready (Ready=Unknown)"),
    ([], "node n is not Ready (Ready=Unknown)"),
    ([{"type": "MemoryPressure", "status": "True"}, {"type": "Ready", "status": "True"}], ""),
], ids=["ready", "not-ready", "unknown", "no-condition", "pressure-only"])
def test_which_node_conditions_withdraw_its_pods(conditions: list[dict], down: str) -> None:
    obj = {"metadata": {"name": "n"}, "status": {"conditions": conditions}}

    assert ko.node_down(obj) == down


def test_a_cordoned_or_tainted_node_keeps_its_pods_in_traffic() -> None:
    """Cordons and NoSchedule taints keep new pods off; running ones serve on."""
    for obj in (node("c", unschedulable=True),
                node("t", taints=[{"key": "k", "effect": "NoSchedule"}])):
        assert ko.unschedulable_reason(obj) and ko.node_down(obj) == ""


@pytest.mark.parametrize(("period", "threshold", "period_seconds"),
                         [(1.0, 3, 1), (10.0, 5, 10), (0.1, 1, 1), (2.5, 2, 3)])
def test_the_pod_manifest_carries_the_services_probe(
    period: float, threshold: int, period_seconds: int
) -> None:
    """Kubernetes takes whole seconds (at least 1): a sub-second period, fine on the local
    backend, is rounded up for a Pod."""
    spec = sample_spec(readiness_period_s=period, readiness_failure_threshold=threshold)
    start = StartPod(pod="p", spec=spec, node="n", requested_at=0.0, placed_at=0.0)

    probe = ko.pod_manifest(start, namespace="ns", image="i", port=8080)[
        "spec"]["containers"][0]["readinessProbe"]

    assert (probe["periodSeconds"], probe["failureThreshold"]) == (period_seconds, threshold)


@pytest.mark.parametrize("knobs", [{"readiness_period_s": 0.0},
                                   {"readiness_failure_threshold": 0}])
def test_a_probe_that_could_never_run_is_refused(knobs: dict) -> None:
    with pytest.raises(SpecError, match="readiness probe"):
        sample_spec(**knobs).validate()
