"""The metrics as an operator meets them through `fnplane up` and the CLI: `up` prints a
metrics URL for every process (the roles, and each control-function instance the
coordinator started as a process of its own), each of which answers with that process's
series; `describe` and `status` show figures read from those same endpoints; and with a
ratio sampler that keeps no trace, the cold start is still counted while no span leaves for
the collector (the in-process OTLP receiver of tests/test_otlp.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import urllib3

from controlplane import metricsread
from kernel.metrics import scrape
from tests.stackutil import REPO
from tests.test_fnplane_up import Up
from tests.test_otlp import otlp_receiver

# A series each kind of process shows once it has taken part in a cold start.
EVIDENCE = {
    "coordinator": "fnplane_partition_map_version",
    "nodes": "fnplane_node_pods_started_total",
    "schedule": "fnplane_schedule_placements_total",
    "scale": "fnplane_revision_pods_desired",
    "route": "fnplane_route_updates_total",
}
METRICS_LINE = re.compile(r"^\s+metrics\s+(\S+): (http://\S+/metrics)", re.M)


def _figures(text: str) -> dict[str, str]:
    """`what n, what n` of the CLI's "Metrics:" line."""
    line = next(x for x in text.splitlines() if x.startswith("Metrics:"))
    pairs = (p.strip().rsplit(" ", 1) for p in line.split(":", 1)[1].split(","))
    return {what: value for what, value in pairs}


@pytest.mark.timeout(120)
def test_up_prints_every_processs_metrics_and_the_cli_reads_them_with_no_trace_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with otlp_receiver() as (endpoint, got):
        # Every process of `up` inherits these: a collector, and a sampler keeping nothing.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
        up = Up(tmp_path / "state")
        try:
            printed = dict(METRICS_LINE.findall("".join(up.banner)))
            # The roles, and the instances the coordinator runs as processes of their own.
            kinds = {name.split("-", 1)[0] for name in printed}
            assert {"coordinator", "nodes", "schedule", "scale", "route"} <= kinds, printed
            http = urllib3.PoolManager()
            out = up.cli("deploy", "sample", "--min-scale", "0")
            assert out.returncode == 0, out.stderr
            body = (REPO / "examples/sample/request_v2.json").read_bytes()
            r = http.request("POST", f"http://127.0.0.1:{up.port}/v2/models/sample/infer",
                             body=body, timeout=30.0)
            assert r.status == 200, r.data
            # The printed URLs show each process's part of that cold start (a component
            # shows a series once it has counted something).
            seen: dict[str, set[str]] = {}
            for name, url in printed.items():
                r = http.request("GET", url, timeout=5.0)
                assert r.status == 200, (name, url)
                seen.setdefault(name.split("-", 1)[0], set()).update(
                    n for n, _ in scrape(r.data.decode()))
            for kind, series in EVIDENCE.items():
                assert series in seen[kind], (kind, sorted(seen[kind]))

            desc = up.cli("describe", "sample")
            assert desc.returncode == 0, desc.stderr
            figures = _figures(desc.stdout)
            assert figures["requests"] == "1" and figures["cold starts"] == "1", desc.stdout
            assert figures["desired pods"] != "?", desc.stdout  # scale's gauge was read
            assert "unreachable" not in desc.stdout, desc.stdout
            status = up.cli("status")
            assert status.returncode == 0, status.stderr
            assert int(_figures(status.stdout)["placements"]) >= 1, status.stdout
            assert "METRICS" in status.stdout
            # Nothing reachable at a given URL: said, not waited for.
            gone = up.cli("describe", "sample", "--metrics-url", "http://127.0.0.1:9/metrics")
            assert gone.returncode == 0 and "unreachable: http://127.0.0.1:9/metrics" in (
                gone.stdout), gone.stdout
        finally:
            code = up.interrupt()
        assert code == 0
        # Every process pushed its metrics as it stopped, the cold start among them...
        deadline = time.monotonic() + 10
        while "fnplane.cold_starts" not in got.metrics and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "fnplane.cold_starts" in got.metrics, got.metrics
        # ...and the exporters ran, yet the sampler kept no span of it.
        assert got.spans == [], got.spans[:5]


@pytest.mark.parametrize(("env", "want"), [
    ({}, "ParentBased{root:AlwaysOnSampler"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
     "TraceIdRatioBased{0.0}"),
    ({"OTEL_TRACES_SAMPLER": "always_off"}, "AlwaysOffSampler"),
])
def test_otel_traces_sampler_wins_over_our_default(env: dict[str, str], want: str) -> None:
    """A fresh process each (the tracer provider is installed once per process)."""
    code = ("from kernel import telemetry; from opentelemetry import trace; "
            "telemetry.setup_tracing(); "
            "print(trace.get_tracer_provider().sampler.get_description())")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(want), run.stdout


def _series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return scrape(text)


EXPOSITION = """\
# TYPE fnplane_cold_starts counter
fnplane_cold_starts_total{kn_service_name="a",component="activator-1"} 2.0
fnplane_cold_starts_total{kn_service_name="a",component="activator-2"} 1.0
fnplane_cold_starts_total{kn_service_name="b",component="activator-1"} 5.0
# TYPE fnplane_revision_pods_desired gauge
fnplane_revision_pods_desired{kn_service_name="a",component="scale-old"} 1.0
fnplane_revision_pods_desired{kn_service_name="a",component="scale-new"} 3.0
fnplane_revision_pods_desired{kn_service_name="c",kn_revision_name="c-00001",component="s1"} 2.0
fnplane_revision_pods_desired{kn_service_name="c",kn_revision_name="c-00001",component="s0"} 1.0
fnplane_revision_pods_desired{kn_service_name="c",kn_revision_name="c-00002",component="s1"} 4.0
"""


@pytest.mark.parametrize(("service", "want"), [
    # Counters add up over gateways; a gauge is the highest any instance shows.
    ("a", "requests ?, cold starts 3, refused ?, desired pods 3"),
    ("b", "requests ?, cold starts 5, refused ?, desired pods ?"),
    ("zzz", "requests ?, cold starts ?, refused ?, desired pods ?"),
    # A service's revisions: each revision's highest, added up (2 + 4).
    ("c", "requests ?, cold starts ?, refused ?, desired pods 6"),
])
def test_describes_figures_from_a_scrape(service: str, want: str) -> None:
    figures = metricsread.service_figures(_series(EXPOSITION), service)
    assert metricsread.render(figures).startswith(want)


@pytest.mark.parametrize(("url", "want"), [
    ("http://127.0.0.1:8080/v2/models/s/infer", "http://127.0.0.1:8080/metrics"),
    ("https://gw.example:443/v1/models/s:predict", "https://gw.example:443/metrics"),
    ("", ""),
])
def test_the_gateways_metrics_are_at_the_service_urls_origin(url: str, want: str) -> None:
    assert metricsread.gateway_metrics_url(url) == want


async def test_an_unreachable_endpoint_is_named_not_waited_for() -> None:
    got = await metricsread.scrape_all(["http://127.0.0.1:9/metrics", ""], timeout_s=1.0)
    assert got.read == [] and list(got.unreachable) == ["http://127.0.0.1:9/metrics"]
    assert "unreachable: http://127.0.0.1:9/metrics" in got.line()
