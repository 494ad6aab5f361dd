"""The burst experiment of issue 4 in a small configuration, end to end: `python -m
loadtests.burst` starts its own stack (nats-server, Redis, control functions, local pods),
bursts the sample service from zero, and must answer every request, never exceed container
concurrency, print one JSON object with every field, write its plot, and leave no process
behind. Plus the arithmetic of its summary, table-driven."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.report import (
    PodStats,
    RequestRecord,
    cc_violations,
    errors_by_status,
    percentile,
    summarize,
)
from tests.loadtestutil import run_quick

FIELDS = {
    "requests",
    "ok",
    "errors_by_status",
    "lost",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "first_cold_start_ms",
    "max_pods",
    "cc_violations",
    "time_to_direct_mode_s",
    "proxy_p50_ms",
    "direct_p50_ms",
    "activator_added_p50_ms",
    "processes_left",
    "plots",
    "json",
}


@pytest.mark.timeout(60)
def test_small_burst_from_zero_loses_nothing_and_honours_container_concurrency(
    tmp_path: Path,
) -> None:
    out = run_quick("loadtests.burst", tmp_path, "--requests", "120", "--concurrency", "40",
                    "--latency-pairs", "20")

    assert FIELDS <= out.keys(), f"missing fields: {FIELDS - out.keys()}"
    assert out["requests"] == 120
    assert out["lost"] == 0, out["errors_by_status"]
    assert out["ok"] == out["requests"], out["errors_by_status"]
    assert out["cc_violations"] == 0, out["pod_max_in_flight"]
    assert out["pod_requests_total"] == 120, "each request answered by exactly one pod"
    assert 1 <= out["max_pods"] <= 4
    assert out["first_cold_start_ms"] is not None and out["first_cold_start_ms"] > 0
    assert out["p50_ms"] <= out["p95_ms"] <= out["p99_ms"]
    assert out["proxy_p50_ms"] > 0 and out["direct_p50_ms"] > 0
    assert out["processes_left"] == 0

    assert json.loads((tmp_path / "burst.json").read_text()) == out
    for plot in out["plots"]:
        png = Path(plot)
        assert png.parent == tmp_path
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
def test_a_burst_against_a_50_50_split_from_zero_loses_nothing(tmp_path: Path) -> None:
    """Two revisions, each at zero with its own KPA, behind one name: the burst wakes both,
    every request is answered by one of them, each answers about half."""
    out = run_quick("loadtests.burst", tmp_path, "--split", "50", "--requests", "200",
                    "--concurrency", "50", "--latency-pairs", "5")
    assert out["lost"] == 0 and out["ok"] == 200, out["errors_by_status"]
    assert out["cc_violations"] == 0, out["pod_max_in_flight"]
    assert out["pod_requests_total"] == 200
    by = out["by_revision"]
    assert set(by) == {"sample-00001", "sample-00002"} and sum(by.values()) == 200, by
    assert all(60 <= n <= 140 for n in by.values()), by  # 50/50 by draw, not exactly
    assert out["processes_left"] == 0


# ---- the summary's arithmetic ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "pct", "want"),
    [
        ([], 50, None),
        ([7.0], 99, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([4.0, 3.0, 2.0, 1.0], 95, 4.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], pct: float, want: float | None) -> None:
    assert percentile(values, pct) == want


def test_a_request_without_an_http_answer_is_an_error_and_lost() -> None:
    records = [
        RequestRecord(0.0, 10.0, 200, "p1"),
        RequestRecord(0.0, 10.0, 503),
        RequestRecord(0.1, 90_000.0, 0, error="ServerTimeoutError"),
    ]
    assert errors_by_status(records) == {"503": 1, "ServerTimeoutError": 1}
    out = summarize(
        records,
        duration_s=1.0,
        pods=[],
        buffer=[],
        modes=[],
        pod_stats=[],
        container_concurrency=4,
        throttler_violations=0,
    )
    assert (out["ok"], out["lost"]) == (1, 1)


@pytest.mark.parametrize(
    ("peaks", "cc", "want"),
    [
        ([4, 4, 3], 4, 0),
        ([5, 4, 1], 4, 1),
        ([9, 9], 0, 0),  # 0 = unlimited, as Knative
    ],
)
def test_cc_violations_count_pods_over_their_limit(peaks: list[int], cc: int, want: int) -> None:
    stats = [PodStats(f"p{i}", peak, 10) for i, peak in enumerate(peaks)]
    assert cc_violations(stats, cc) == want
