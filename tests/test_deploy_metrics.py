"""deploy/'s metrics, checked offline: every component's pods say where Prometheus scrapes
them (annotations naming a port the container has and the process listens on), and the
monitoring overlay builds, validates, and points its ServiceMonitor at ports that exist."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from controlplane import dashboard
from tests.deployutil import build


def _deployments(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "Deployment"]


def test_every_component_says_where_its_metrics_are() -> None:
    for dep in _deployments(build("base")):
        name = dep["metadata"]["name"]
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true", name
        assert notes["prometheus.io/path"] == "/metrics", name
        port = int(notes["prometheus.io/port"])
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert port in {p["containerPort"] for p in container.get("ports", [])}, name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if name == "fnplane-activator":  # its /metrics is on its own listener
            assert port == 8080 and "FNPLANE_METRICS_PORT" not in env
        else:
            assert env["FNPLANE_METRICS_PORT"] == str(port), name
            assert env["FNPLANE_METRICS_HOST"] == "0.0.0.0", name


def test_the_monitoring_overlay_builds_and_its_service_monitor_finds_the_ports() -> None:
    docs = build("overlays/monitoring")
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD's kind: no schema here
            continue
        try:
            kubernetes_validate.validate(doc, "1.37", strict=True)
        except Exception as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    want = monitors[0]["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"
                and want.items() <= d["metadata"].get("labels", {}).items()]
    assert {s["metadata"]["name"] for s in services} == {"fnplane-metrics", "fnplane-activator"}
    ports = {p["name"] for s in services for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitors[0]["spec"]["endpoints"]} <= ports
    board = next(d for d in docs if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"] == "fnplane-grafana-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["fnplane.json"]) == dashboard.dashboard()
