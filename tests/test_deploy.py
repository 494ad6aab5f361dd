"""deploy/ checked offline, as a cluster admin would review it before applying — no cluster
can run here: `kubectl kustomize` builds the base and the dev overlay, every built object
validates against the Kubernetes schemas (kubernetes-validate, strict), the FnService CRD's
schema (with its CEL rules) accepts examples/'s FnService and refuses bad ones the same way
`fnplane deploy -f` does, and RBAC is least privilege."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.specfile import spec_from_manifest
from kernel.messages import SpecError
from tests.deployutil import allowed, build, cel, crd, validate_custom_resource
from tests.fakekube import ApiCall
from tests.stackutil import REPO

SAMPLE = yaml.safe_load((REPO / "examples/sample/fnservice.yaml").read_text())
COMPONENTS = ("coordinator", "scale", "schedule", "route", "activator", "node", "operator")
WORKLOADS = ("Deployment", "StatefulSet")


@pytest.mark.parametrize("path", ["base", "overlays/dev"])
def test_kustomization_builds_and_every_object_validates_strictly(path: str) -> None:
    docs = build(path)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "Role", "ClusterRole",
            "Deployment", "StatefulSet", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.37", strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError: both are failures
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert all(d["metadata"].get("namespace") in (None, "fnplane") for d in docs)


def _pods(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in WORKLOADS]


@pytest.mark.parametrize("path", ["base", "overlays/dev"])
def test_workloads_are_hardened_and_sized(path: str) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities,
    requests and limits, readiness and liveness probes: on every container."""
    for name, pod in _pods(build(path)):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            assert "readinessProbe" in c and "livenessProbe" in c, name


def test_one_service_account_per_component_and_tokens_only_where_the_api_is_used() -> None:
    docs = build("base")
    pods = dict(_pods(docs))
    for comp in COMPONENTS:
        pod = pods[f"fnplane-{comp}"]
        assert pod["serviceAccountName"] == f"fnplane-{comp}"
        assert pod["containers"][0]["args"] == [comp]
        assert pod["automountServiceAccountToken"] is (
            comp in ("coordinator", "node", "operator")), comp
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "fnplane-activator"}
    assert pdb["spec"]["minAvailable"] == 1


def test_no_role_grants_a_wildcard_and_only_the_node_backend_creates_pods() -> None:
    docs = build("base")
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (role["metadata"]["name"], rule)
    for comp in COMPONENTS:
        for resource in ("pods", "pods/binding", "bindings"):
            call = ApiCall("create", "", resource, "fnplane", "x")
            assert allowed(comp, call) is (comp == "node" and resource != "bindings"), (
                comp, resource)
    # The coordinator scales `schedule` only: its scale subresource, by name.
    scale = ("apps", "deployments/scale")
    assert allowed("coordinator", ApiCall("patch", *scale, "fnplane", "fnplane-schedule"))
    assert not any(allowed("coordinator", ApiCall(v, *scale, "fnplane", name))
                   for v, name in (("patch", "fnplane-activator"), ("update", "fnplane-schedule"),
                                   ("patch", ""), ("get", "fnplane-node")))
    assert not allowed("coordinator", ApiCall("patch", "apps", "deployments", "fnplane",
                                              "fnplane-schedule"))
    # Components that never talk to the API are bound to no role at all.
    for comp in ("scale", "schedule", "route", "activator"):
        assert not any(allowed(comp, ApiCall(v, g, r, "fnplane", ""))
                       for v in ("get", "list", "watch", "create", "update", "patch", "delete")
                       for g, r in (("", "pods"), ("", "nodes"), ("fnplane.dev", "fnservices"),
                                    ("", "secrets"), ("apps", "deployments/scale")))


def test_least_privilege_checker_refuses_what_the_roles_do_not_grant() -> None:
    """The check used on every fake-API test's recorded calls is not vacuous."""
    assert allowed("node", ApiCall("watch", "", "pods", "fnplane", ""))
    assert allowed("node", ApiCall("list", "", "nodes", "", ""))
    refused = [ApiCall("get", "", "secrets", "fnplane", "x"),
               ApiCall("list", "", "pods", "", ""),  # all namespaces: the Role is namespaced
               ApiCall("create", "", "pods", "kube-system", "x"),
               ApiCall("patch", "", "nodes", "", "n1"),
               ApiCall("update", "", "pods/status", "fnplane", "x")]
    assert [c for c in refused if allowed("node", c)] == []


# ---- the FnService CRD -----------------------------------------------------------------------


def test_crd_is_namespaced_v1alpha1_with_a_status_subresource() -> None:
    spec = crd()["spec"]
    assert spec["group"] == "fnplane.dev" and spec["scope"] == "Namespaced"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}


def test_the_sample_fnservice_is_accepted_by_the_crd_and_by_fnplane_deploy() -> None:
    assert validate_custom_resource(SAMPLE, crd()) == []
    assert spec_from_manifest(copy.deepcopy(SAMPLE)).name == "sample"


def _variant(**predictor: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    for key, value in predictor.items():
        if value is None:
            doc["spec"]["predictor"].pop(key, None)
        else:
            doc["spec"]["predictor"][key] = value
    return doc


def _container(**fields: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["spec"]["predictor"]["container"].update(fields)
    return doc


BAD = [
    ("min above max", _variant(minReplicas=5, maxReplicas=2), "minReplicas must be <="),
    ("negative container concurrency", _variant(containerConcurrency=-1), "minimum"),
    ("unknown scale metric", _variant(scaleMetric="qps"), "is not one of"),
    ("scale window under 6s", _variant(scaleWindowSeconds=5), "minimum"),
    ("readiness path not absolute", _container(readinessPath="health"), "does not match"),
    ("empty argument in command", _container(command=["python", ""]), "non-empty"),
    ("unknown predictor field", _variant(replicas=3), "Additional properties"),
    ("negative min replicas", _variant(minReplicas=-1), "minimum"),
]


@pytest.mark.parametrize("doc,why", [(d, w) for _, d, w in BAD], ids=[n for n, _, _ in BAD])
def test_the_crd_refuses_what_fnplane_deploy_refuses(doc: dict[str, Any], why: str) -> None:
    errors = validate_custom_resource(doc, crd())
    assert any(why in e for e in errors), errors
    with pytest.raises(SpecError):
        spec_from_manifest(copy.deepcopy(doc))


GOOD = [
    ("unbounded max", _variant(minReplicas=3, maxReplicas=0)),
    ("no bounds at all", _variant(minReplicas=None, maxReplicas=None)),
    ("equal bounds", _variant(minReplicas=2, maxReplicas=2)),
    ("rps metric", _variant(scaleMetric="rps", scaleTarget=50)),
    ("empty command runs the sample", _container(command=[])),
    ("gpu as integer", _container(resources={"requests": {"cpu": 1, "memory": "1Gi",
                                                          "nvidia.com/gpu": 1}})),
]


@pytest.mark.parametrize("doc", [d for _, d in GOOD], ids=[n for n, _ in GOOD])
def test_the_crd_accepts_what_fnplane_deploy_accepts(doc: dict[str, Any]) -> None:
    assert validate_custom_resource(doc, crd()) == []
    spec_from_manifest(copy.deepcopy(doc))


def test_a_name_longer_than_a_dns_label_is_refused_by_cel() -> None:
    doc = copy.deepcopy(SAMPLE)
    doc["metadata"]["name"] = "s" * 64
    assert any("DNS label" in e for e in validate_custom_resource(doc, crd()))


def test_the_cel_translator_refuses_what_it_does_not_know() -> None:
    assert cel("!has(self.a) || self.a <= 3", {"a": 2})
    assert not cel("has(self.a) && self.a == 0", {})
    with pytest.raises(ValueError):
        cel("self.a.all(x, x > 0)", {"a": [1]})
    with pytest.raises(ValueError):
        cel("__import__('os')", {})
    with pytest.raises(ValueError):
        cel("self.__class__ == 1", {})


def test_the_dockerfile_runs_components_by_argument() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "controlplane.component"]' in text
    assert "USER 10001" in text
    assert Path(REPO / ".dockerignore").exists()
