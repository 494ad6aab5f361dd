"""The metrics catalogue and its exposition, without a stack: names as OpenTelemetry's
Prometheus exporter writes them (units, `_total`), help text, one `component` label per
component, the README's table and the Grafana dashboard in step with the catalogue."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as gd
from grafana_foundation_sdk.models import prometheus, timeseries
from prometheus_client.parser import text_string_to_metric_families

from controlplane import dashboard
from kernel import metrics
from kernel.metrics import CATALOGUE, SERVICE, LabelCache, Metrics, prom_sample_names
from kernel.metricsport import MetricsPort

REPO = Path(__file__).resolve().parent.parent


def test_series_are_named_as_the_prometheus_exporter_names_them() -> None:
    m, other = Metrics("scale-a1"), Metrics("scale-b2")
    try:
        m.counter("fnplane.scale.decisions").add(2, {SERVICE: "s", "direction": "up"})
        other.counter("fnplane.scale.decisions").add(1, {SERVICE: "s", "direction": "up"})
        m.histogram("fnplane.cold_start.duration").record(1.5, {SERVICE: "s"})
        m.gauge("fnplane.revision.pods.desired").set(3, {SERVICE: "s"})
        families = {f.name: f for f in text_string_to_metric_families(metrics.render([m, other]))}
    finally:
        m.close()
        other.close()
    decisions = families["fnplane_scale_decisions"]
    assert decisions.type == "counter" and decisions.documentation
    assert {(s.name, s.labels["component"], s.value) for s in decisions.samples} == {
        ("fnplane_scale_decisions_total", "scale-a1", 2.0),
        ("fnplane_scale_decisions_total", "scale-b2", 1.0)}
    cold = families["fnplane_cold_start_duration_seconds"]
    assert cold.type == "histogram"
    by_name = {(s.name, s.labels.get("le")): s.value for s in cold.samples}
    assert by_name[("fnplane_cold_start_duration_seconds_count", None)] == 1
    assert by_name[("fnplane_cold_start_duration_seconds_sum", None)] == 1.5
    assert by_name[("fnplane_cold_start_duration_seconds_bucket", "1.0")] == 0
    assert by_name[("fnplane_cold_start_duration_seconds_bucket", "2.5")] == 1
    assert by_name[("fnplane_cold_start_duration_seconds_bucket", "+Inf")] == 1
    assert families["fnplane_revision_pods_desired"].samples[0].value == 3


def test_a_closed_component_leaves_the_process_exposition() -> None:
    m = Metrics("route-x9")
    m.counter("fnplane.route.updates").add(1, {SERVICE: "s"})
    assert "route-x9" in metrics.render()
    m.close()
    assert "route-x9" not in metrics.render()


async def test_an_inline_stacks_port_shows_only_components_born_after_it() -> None:
    """A test process keeps what earlier tests left unclosed; the stack's port is the stack's."""
    older = Metrics("activator-older")
    port = MetricsPort(only_newer=True)
    await port.start()
    newer = Metrics("activator-newer")
    try:
        for m in (older, newer):
            m.counter("fnplane.revision.requests").add(1, {SERVICE: "s"})
        async with aiohttp.ClientSession() as http, http.get(port.url) as r:
            text = await r.text()
        assert "activator-newer" in text
        assert "activator-older" not in text
    finally:
        await port.stop()
        older.close()
        newer.close()


def test_value_reads_one_components_series() -> None:
    m = Metrics("activator-v1")
    try:
        m.counter("fnplane.revision.requests").add(4, {SERVICE: "a"})
        m.counter("fnplane.revision.requests").add(1, {SERVICE: "b"})
        assert m.value("fnplane_revision_requests_total", kn_service_name="a") == 4
        assert m.value("fnplane_revision_requests_total") == 5
        assert m.value("fnplane_revision_requests_total", kn_service_name="zzz") == 0
    finally:
        m.close()


@pytest.mark.parametrize(("variable", "value"), [("OTEL_SDK_DISABLED", "true"),
                                                 ("FNPLANE_METRICS", "off")])
def test_sdk_disabled_makes_metrics_no_ops(monkeypatch: pytest.MonkeyPatch, variable: str,
                                           value: str) -> None:
    monkeypatch.setenv(variable, value)
    m = Metrics("schedule-off")
    m.counter("fnplane.schedule.placements").add(1, {"outcome": "placed"})
    assert "schedule-off" not in metrics.render() and m.render().strip() == ""
    m.close()


def test_label_cache_builds_each_attribute_set_once() -> None:
    by_service = LabelCache(SERVICE, path="direct")
    first = by_service["a"]
    assert first == {SERVICE: "a", "path": "direct"} and by_service["a"] is first


def test_every_instrument_is_namespaced_and_explained() -> None:
    assert len({i.name for i in CATALOGUE}) == len(CATALOGUE)
    for inst in CATALOGUE:
        assert inst.name.startswith("fnplane."), inst.name
        assert inst.kind in ("counter", "updown", "gauge", "histogram"), inst.name
        assert inst.help.endswith("."), inst.name
        if inst.kind == "histogram":
            assert inst.unit == "s" and prom_sample_names(inst)[0].endswith("_seconds_bucket")


def test_the_readme_lists_every_series_as_prometheus_shows_it() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- metrics table: generated by `python -m kernel.metrics` -->\n")[1]
    table = table.split("<!-- end of metrics table -->")[0]
    assert table == metrics.markdown_table(), "run `python -m kernel.metrics` into the README"
    # Nothing in the README names a series that no longer exists.
    named = set(re.findall(r"`(fnplane_[a-z0-9_]+)`", readme))
    every = {n for i in CATALOGUE for n in prom_sample_names(i)}
    assert named <= every, named - every


def test_the_dashboard_is_valid_and_written_from_code() -> None:
    board = dashboard.dashboard()
    on_disk = json.loads(dashboard.DASHBOARD.read_text())
    assert on_disk == board, "run `python -m controlplane.dashboard`"
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    every = {n for i in CATALOGUE for n in prom_sample_names(i)}
    for panel in board["panels"]:
        assert panel["type"] == "timeseries" and panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["datasource"] == dashboard.DATASOURCE.to_json()
    assert dashboard.series_named(board) <= every
    # Grafana's schema, as grafana-foundation-sdk's types have it (generated from it): the
    # file reads into a typed `Dashboard` and writes back unchanged, so no field is unknown
    # to the schema or misnamed (those would be dropped) and every panel is a timeseries
    # with Prometheus queries (the SDK's panel and query plugins type options and targets).
    plugins.register_default_plugins()
    typed = gd.Dashboard.from_json(on_disk)
    assert json.loads(json.dumps(typed, cls=JSONEncoder)) == on_disk
    assert all(isinstance(p, gd.Panel) and p.type_val == "timeseries"
               and isinstance(p.options, timeseries.Options) for p in typed.panels)
    assert all(isinstance(t, prometheus.Dataquery) for p in typed.panels for t in p.targets)
    # The overlay's ConfigMap is made from that file.
    overlay = REPO / "deploy" / "overlays" / "monitoring"
    assert "fnplane.json=dashboard.json" in (overlay / "kustomization.yaml").read_text()



def test_a_hot_counter_is_exported_as_the_same_counter() -> None:
    """The request path's counters are dict updates read by an observable counter at
    collection: Prometheus sees an ordinary counter, from 0 when told so."""
    m = Metrics("schedule-hot")
    try:
        placements = m.hot_counter("fnplane.schedule.placements", "outcome")
        assert m.hot_counter("fnplane.schedule.placements", "outcome") is placements
        placements.add("unschedulable", 0)
        for _ in range(3):
            placements.add("placed")
        families = {f.name: f for f in text_string_to_metric_families(m.render())}
        fam = families["fnplane_schedule_placements"]
        assert fam.type == "counter"
        assert {(s.name, s.labels["outcome"], s.value) for s in fam.samples} == {
            ("fnplane_schedule_placements_total", "placed", 3.0),
            ("fnplane_schedule_placements_total", "unschedulable", 0.0)}
        with pytest.raises(TypeError):
            m.counter("fnplane.schedule.placements")  # one way per name
    finally:
        m.close()


def test_a_hot_histogram_is_exported_as_the_sdks_histogram_would_be() -> None:
    """The placement path's histogram aggregates itself (kernel/hothistogram.py): a scrape
    shows the same samples as the SDK's histogram fed the same values, bucket by bucket."""
    sdk, hot = Metrics("schedule-sdk"), Metrics("schedule-hot")
    try:
        sdk_hist = sdk.histogram("fnplane.schedule.placement.duration")
        hot_hist = hot.hot_histogram("fnplane.schedule.placement.duration")
        assert hot.hot_histogram("fnplane.schedule.placement.duration") is hot_hist
        assert "fnplane_schedule" not in hot.render()  # nothing recorded, nothing shown
        for value in (0.0005, 0.001, 0.0025, 0.003, 0.2, 100.0):  # on bounds and between
            sdk_hist.record(value)
            hot_hist.record(value)

        def samples(m: Metrics) -> dict[tuple[str, str | None], float]:
            return {(name, dict(labels).get("le")): v
                    for (name, labels), v in metrics.scrape(m.render()).items()}

        assert samples(hot) == samples(sdk)
        assert samples(hot)[("fnplane_schedule_placement_duration_seconds_count", None)] == 6
        with pytest.raises(TypeError):
            hot.histogram("fnplane.schedule.placement.duration")  # one way per name
    finally:
        sdk.close()
        hot.close()
