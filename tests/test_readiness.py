"""Readiness after start-up, the pure parts (issue 14): the probe's thresholds as a kubelet
counts them, which Node conditions take a node's pods out of traffic, the probe a Pod
manifest carries, and how a user sets it (FnService manifest, CRD, `fnplane deploy`).
No NATS, no processes."""

from __future__ import annotations

import copy

import pytest
import yaml

from controlplane.cli import build_parser, spec_from_flags
from controlplane.specfile import spec_from_manifest
from kernel.messages import SpecError, StartPod
from partitions.agents.kubernetes import objects as ko
from partitions.agents.readiness import ReadinessProbe
from tests.deployutil import crd as crd_definition
from tests.deployutil import validate_custom_resource
from tests.kubelet import node
from tests.stackutil import REPO, sample_spec

SAMPLE_MANIFEST = yaml.safe_load((REPO / "examples/sample/fnservice.yaml").read_text())

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
    """Cordons and NoSchedule taints keep new pods off (a taint only the pods that do not
    tolerate it: partitions/tolerations.py); running ones serve on."""
    cordoned = node("c", unschedulable=True)
    assert ko.unschedulable_reason(cordoned) and ko.node_down(cordoned) == ""
    assert ko.node_down(node("t", taints=[{"key": "k", "effect": "NoSchedule"}])) == ""


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


# ---- how a user sets it: FnService manifest (and its CRD), `fnplane deploy` flags ----------

def _manifest(probe: dict | None) -> dict:
    doc = copy.deepcopy(SAMPLE_MANIFEST)
    if probe is not None:
        doc["spec"]["predictor"]["container"]["readinessProbe"] = probe
    return doc


@pytest.mark.parametrize(("probe", "period", "threshold"), [
    (None, 1.0, 3),
    ({"periodSeconds": 10}, 10.0, 3),
    ({"periodSeconds": 2, "failureThreshold": 5}, 2.0, 5),
], ids=["defaults", "period", "both"])
def test_a_manifest_sets_the_probe_as_a_kubernetes_probe(
    probe: dict | None, period: float, threshold: int
) -> None:
    doc = _manifest(probe)

    spec = spec_from_manifest(doc)

    assert validate_custom_resource(doc, crd_definition()) == []
    assert (spec.readiness_period_s, spec.readiness_failure_threshold) == (period, threshold)


@pytest.mark.parametrize("probe", [{"periodSeconds": 0}, {"failureThreshold": 0},
                                   {"httpGet": {"path": "/x"}}],
                         ids=["zero-period", "zero-threshold", "unhonoured-field"])
def test_a_manifest_probe_fnplane_cannot_honour_is_refused(probe: dict) -> None:
    with pytest.raises(SpecError):
        spec_from_manifest(_manifest(probe))


def test_deploy_flags_set_the_probe() -> None:
    args = build_parser().parse_args(["deploy", "svc", "--readiness-period", "500ms",
                                      "--readiness-failure-threshold", "2"])

    spec = spec_from_flags(args)

    assert (spec.readiness_period_s, spec.readiness_failure_threshold) == (0.5, 2)
