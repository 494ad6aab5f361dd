"""The FnService CRD's side of revisions, checked offline as the API server would: Knative's
`spec.traffic` block and KServe's `canaryTrafficPercent` are accepted by the schema and read
into the same deploy request as `fnplane deploy --traffic/--canary-percent`; the status
lists revisions and their traffic, shown as `kubectl get fns` columns."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from controlplane.operator import status_for
from controlplane.specfile import spec_from_manifest, traffic_from_manifest
from kernel.messages import (
    RevisionStatus,
    ServiceStatus,
    SpecError,
    TrafficTarget,
)
from tests.deployutil import crd, validate_custom_resource
from tests.stackutil import REPO, sample_spec

SAMPLE = yaml.safe_load((REPO / "examples/sample/fnservice.yaml").read_text())


def with_(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    pred = spec.pop("predictor", {})
    doc["spec"].update(spec)
    doc["spec"]["predictor"].update(pred)
    return doc


def test_a_traffic_block_is_accepted_and_read_as_knatives() -> None:
    doc = with_(traffic=[{"latestRevision": True, "percent": 10, "tag": "canary"},
                         {"revisionName": "sample-00001", "percent": 90, "tag": "stable"}])
    assert validate_custom_resource(doc, crd()) == []
    spec_from_manifest(copy.deepcopy(doc))
    assert traffic_from_manifest(doc) == {
        "traffic": [TrafficTarget(revision="@latest", percent=10),
                    TrafficTarget(revision="sample-00001", percent=90)],
        "tags": {"@latest": "canary", "sample-00001": "stable"}, "canary_percent": None}


def test_canary_traffic_percent_is_kserves() -> None:
    doc = with_(predictor={"canaryTrafficPercent": 10})
    assert validate_custom_resource(doc, crd()) == []
    assert traffic_from_manifest(doc)["canary_percent"] == 10


@pytest.mark.parametrize("doc", [
    with_(predictor={"canaryTrafficPercent": 101}),
    with_(traffic=[{"percent": 100}]),  # names no revision
    with_(traffic=[{"revisionName": "x", "percent": -1}]),
])
def test_the_crd_refuses_a_traffic_block_that_means_nothing(doc: dict[str, Any]) -> None:
    assert validate_custom_resource(doc, crd()) != []


def test_traffic_and_canary_together_are_refused() -> None:
    with pytest.raises(SpecError):
        traffic_from_manifest(with_(traffic=[{"latestRevision": True, "percent": 100}],
                                    predictor={"canaryTrafficPercent": 10}))


def test_status_lists_revisions_and_their_traffic_as_printer_columns() -> None:
    rev = sample_spec("sample-00002", revision_of="sample")
    spec = sample_spec(revisions=["sample-00001", "sample-00002"],
                       latest_revision="sample-00002",
                       traffic=[TrafficTarget(revision="sample-00002", percent=10, latest=True),
                                TrafficTarget(revision="sample-00001", percent=90)])
    st = ServiceStatus(spec=spec, url="http://x", latest_ready_revision="sample-00002",
                       revisions=[RevisionStatus(spec=rev, percent=10, ready=True)])
    status = status_for(st, 3, {})
    assert status["latestReadyRevisionName"] == "sample-00002"
    assert status["trafficSummary"] == "sample-00002=10%,sample-00001=90%"
    assert status["traffic"][0] == {"revisionName": "sample-00002", "percent": 10,
                                    "latestRevision": True}
    assert status["revisions"] == [{"name": "sample-00002", "ready": True, "readyReplicas": 0,
                                    "percent": 10}]
    doc = {**copy.deepcopy(SAMPLE), "status": status}
    assert validate_custom_resource(doc, crd()) == []
    columns = {c["name"]: c["jsonPath"] for c in crd()["spec"]["versions"][0][
        "additionalPrinterColumns"]}
    assert columns["Latest"] == ".status.latestReadyRevisionName"
    assert columns["Traffic"] == ".status.trafficSummary"
