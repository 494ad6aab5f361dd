"""The Grafana dashboard an operator opens first, written from code: requests and errors
per service, cold starts by stage, pods desired and actual, buffer depth, placements/s and
their p99, probes, partition map changes, instances per function. Every query names series
of kernel/metrics.py's catalogue (a test checks each one against a live scrape).
`python -m controlplane.dashboard` writes deploy/overlays/monitoring/dashboard.json."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common, prometheus, timeseries
from grafana_foundation_sdk.builders import dashboard as gb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as gc
from grafana_foundation_sdk.models import dashboard as gd

DASHBOARD = (Path(__file__).resolve().parent.parent / "deploy" / "overlays" / "monitoring"
             / "dashboard.json")
DATASOURCE = gd.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "[$__rate_interval]"
# The service label: Knative's `kn.service.name` as Prometheus shows it (kernel/metrics.py).
SVC = "kn_service_name"
BY_SVC = "{{" + SVC + "}}"

# (title, unit, [(expr, legend)]), two panels a row.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests per service", "reqps", [
        (f"sum by ({SVC}) (rate(fnplane_revision_requests_total{RATE}))", BY_SVC)]),
    ("Errors per service (gateway refusals)", "reqps", [
        (f"sum by ({SVC}, reason) (rate(fnplane_activator_rejected_total{RATE}))",
         BY_SVC + " {{reason}}")]),
    ("Cold starts per service", "short", [
        (f"sum by ({SVC}) (increase(fnplane_cold_starts_total{RATE}))", BY_SVC)]),
    ("Cold start p90 by stage", "s", [
        ("histogram_quantile(0.9, sum by (le, stage) "
         f"(rate(fnplane_cold_start_stage_duration_seconds_bucket{RATE})))", "{{stage}}"),
        ("histogram_quantile(0.9, sum by (le) "
         f"(rate(fnplane_cold_start_duration_seconds_bucket{RATE})))", "total")]),
    ("Pods desired and actual", "short", [
        (f"sum by ({SVC}) (fnplane_revision_pods_desired)", BY_SVC + " desired"),
        (f"sum by ({SVC}) (fnplane_revision_pods_count)", BY_SVC + " actual"),
        (f"max by ({SVC}) (fnplane_revision_panic_mode)", BY_SVC + " panic")]),
    ("Gateway buffer depth", "short", [
        (f"sum by ({SVC}) (fnplane_revision_request_queued)", BY_SVC + " queued"),
        (f"sum by ({SVC}) (fnplane_revision_request_concurrency)", BY_SVC + " in flight")]),
    ("Request latency p99", "s", [
        (f"histogram_quantile(0.99, sum by (le, {SVC}) "
         f"(rate(fnplane_serving_invocation_duration_seconds_bucket{RATE})))", BY_SVC)]),
    ("Placements per second", "ops", [
        (f"sum by (outcome) (rate(fnplane_schedule_placements_total{RATE}))", "{{outcome}}")]),
    ("Placement latency p99", "s", [
        ("histogram_quantile(0.99, sum by (le) "
         f"(rate(fnplane_schedule_placement_duration_seconds_bucket{RATE})))", "p99")]),
    ("Probes and probe-cache lookups", "ops", [
        (f"sum by (outcome) (rate(fnplane_schedule_probes_total{RATE}))", "probe {{outcome}}"),
        (f"sum by (result) (rate(fnplane_schedule_probe_cache_lookups_total{RATE}))",
         "cache {{result}}")]),
    ("Partition map and ownership changes", "short", [
        (f"sum (increase(fnplane_partition_map_changes_total{RATE}))", "map versions"),
        (f"sum (increase(fnplane_partition_ownership_changes_total{RATE}))", "partition owners"),
        (f"sum by (kind) (increase(fnplane_shard_ownership_changes_total{RATE}))",
         "{{kind}} shard owners"),
        (f"sum by (reason) (increase(fnplane_node_refusals_total{RATE}))",
         "node refusals {{reason}}")]),
    ("Instances per control function", "short", [
        ("max by (kind) (fnplane_instances)", "{{kind}}")]),
]


def _panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]]) -> timeseries.Panel:
    col, row = (pid - 1) % 2, (pid - 1) // 2
    panel = (timeseries.Panel().id(pid).title(title).datasource(DATASOURCE).unit(unit)
             .line_width(1).fill_opacity(10)
             .grid_pos(gd.GridPos(h=8, w=12, x=12 * col, y=8 * row))
             .legend(common.VizLegendOptions().display_mode(gc.LegendDisplayMode.LIST)
                     .placement(gc.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common.VizTooltipOptions().mode(gc.TooltipDisplayMode.MULTI)
                      .sort(gc.SortOrder.NONE)))
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(prometheus.Dataquery().ref_id(chr(ord("A") + i))
                                  .datasource(DATASOURCE).expr(expr).legend_format(legend))
    return panel


def dashboard() -> dict[str, Any]:
    """Built with grafana-foundation-sdk's builders, so the document has the shape of
    Grafana's own dashboard schema (the SDK's types are generated from it; the version
    pinned in pyproject.toml is the one for Grafana 11.6)."""
    board = (gb.Dashboard("fnplane").uid("fnplane").tags(["fnplane"]).editable()
             .timezone("browser").refresh("30s").time("now-1h", "now")
             .with_variable(gb.DatasourceVariable("datasource").label("Prometheus")
                            .type("prometheus")))
    for i, panel in enumerate(PANELS, start=1):
        board = board.with_panel(_panel(i, *panel))
    doc: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return doc


_SERIES = re.compile(r"\bfnplane_[a-z0-9_]+")


def series_named(board: dict[str, Any]) -> set[str]:
    """Every fnplane series the board's queries read."""
    return {name for panel in board["panels"] for t in panel["targets"]
            for name in _SERIES.findall(t["expr"])}


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DASHBOARD
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
