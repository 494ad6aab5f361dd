"""The dataplane probe of issue 11 in its quick configuration, end to end: `python -m
loadtests.dataplane --quick` starts its own stack, deploys one service kept in proxy mode
(target burst capacity -1) and one in direct mode (0), sends open-loop load over the three
paths at two rates, and must answer every request on the path it was meant to take, print
one JSON object with every field (latency, added latency, generator lag, CPU, goal), write
its plot and leave no process behind. No assertion on speed: the figures depend on the
machine; only their presence and consistency are checked. Plus the summary's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import dataplane_report as dr
from tests.loadtestutil import run_quick

TOP = {"goal", "errors", "wrong_path", "rates", "pods", "targets", "processes_left", "plots",
       "json", "options"}
PHASE = {"rate_qps_per_path", "paths", "activator_added_ms", "gateway_direct_added_ms",
         "generator_lag", "cpu"}
PATH = {"requests", "ok", "errors", "errors_by_kind", "achieved_rps", "path_header",
        "wrong_path", "p50_ms", "p95_ms", "p99_ms", "max_ms", "service_p50_ms",
        "service_p99_ms"}
LAG = {"p50_ms", "p99_ms", "max_ms", "late_over_1ms", "late_over_10ms"}
CPU = {"window_s", "cores", "percent_of_one_core", "per_process", "machine_busy_percent",
       "others_percent_of_one_core", "stack_at_rest_percent_of_one_core", "ms_per_request"}
PER_REQUEST = {"stack_per_gateway_request", "stack_per_gateway_request_net", "pod_per_request",
               "generator_per_request"}
GOAL = {"rate_qps", "added_p50_ms", "added_p50_goal_ms", "added_p50_met", "added_p99_ms",
        "added_p99_goal_ms", "added_p99_met", "met"}


@pytest.mark.timeout(60)
def test_quick_probe_answers_every_path_and_reports_every_field(tmp_path: Path) -> None:
    out = run_quick("loadtests.dataplane", tmp_path)

    assert TOP <= out.keys(), f"missing: {TOP - out.keys()}"
    assert out["errors"] == 0 and out["wrong_path"] == 0
    assert out["processes_left"] == 0
    rates = out["options"]["rates"]
    assert list(out["rates"]) == [f"{r:g}" for r in rates]
    for rate, phase in zip(rates, out["rates"].values(), strict=True):
        assert PHASE <= phase.keys(), f"missing: {PHASE - phase.keys()}"
        assert phase["rate_qps_per_path"] == rate
        assert list(phase["paths"]) == list(dr.PATHS)
        want = round(rate * out["options"]["duration_s"])
        for name, row in phase["paths"].items():
            assert PATH <= row.keys(), f"{name} missing: {PATH - row.keys()}"
            assert row["requests"] == row["ok"] == want, (name, row)
            assert row["errors"] == 0 and row["errors_by_kind"] == {}, (name, row)
            assert row["path_header"] == {dr.EXPECTED_HEADER[name]: want}, (name, row)
            assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
            # Measured from the scheduled send: never less than the model's own 100 ms.
            assert row["p50_ms"] >= out["options"]["latency_ms"]
        for key in ("activator_added_ms", "gateway_direct_added_ms"):
            assert set(phase[key]) == {"p50_ms", "p95_ms", "p99_ms"}
            assert all(isinstance(v, float | int) for v in phase[key].values())
        assert phase["generator_lag"].keys() == LAG
        cpu = phase["cpu"]
        assert cpu.keys() == CPU and cpu["window_s"] > 0
        assert cpu["ms_per_request"].keys() == PER_REQUEST
        assert all(v is not None and v >= 0 for v in cpu["ms_per_request"].values())
        assert cpu["ms_per_request"]["stack_per_gateway_request"] > 0
        assert {"generator", "stack", "pod"} <= cpu["percent_of_one_core"].keys()
        assert sum(1 for k in cpu["per_process"] if k.startswith("pod:")) >= 2
    goal = out["goal"]
    assert GOAL <= goal.keys()
    assert goal["rate_qps"] == max(rates)
    assert goal["met"] == (goal["added_p50_met"] and goal["added_p99_met"])
    if not goal["met"]:
        assert "cpu_percent_of_one_core" in goal["why_not"]

    assert json.loads((tmp_path / "dataplane.json").read_text()) == out
    for plot in out["plots"]:
        assert Path(plot).parent == tmp_path
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the summary's arithmetic ------------------------------------------------------------


def _rec(latency: list[float], headers: dict[str, int], status: dict[str, int] | None = None,
         errors: dict[str, int] | None = None) -> dict[str, object]:
    return {"latency_ms": latency, "service_ms": latency, "status": status or {"200": 1},
            "path_header": headers, "errors": errors or {}}


def test_added_latency_is_the_path_minus_the_pod_itself_per_percentile() -> None:
    paths = {
        dr.POD: dr.summarize_path(dr.POD, _rec([100.0, 101.0, 102.0, 150.0], {"-": 4}), 1.0),
        dr.PROXY: dr.summarize_path(dr.PROXY, _rec([101.0, 102.0, 104.0, 160.0],
                                                   {"activator": 4}), 1.0),
    }
    assert dr.added(paths, dr.PROXY) == {"p50_ms": 1.0, "p95_ms": 10.0, "p99_ms": 10.0}
    assert dr.added(paths, dr.GATEWAY_DIRECT) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_an_answer_on_the_wrong_path_or_without_one_is_counted() -> None:
    row = dr.summarize_path(
        dr.GATEWAY_DIRECT,
        _rec([1.0, 2.0, 3.0], {"direct": 1, "activator": 1}, status={"200": 1, "503": 1},
             errors={"ServerTimeoutError": 1}),
        1.0,
    )
    assert row["wrong_path"] == 1
    assert row["errors"] == 2
    assert row["errors_by_kind"] == {"ServerTimeoutError": 1, "http_503": 1}


@pytest.mark.parametrize(
    ("p50", "p99", "met"),
    [(0.8, 4.9, True), (1.2, 4.0, False), (0.5, 12.0, False), (None, None, False)],
)
def test_goal_needs_both_p50_and_p99_within_bounds(
    p50: float | None, p99: float | None, met: bool
) -> None:
    cpu = dr.cpu_summary([dr.CpuReading("stack", "s", 9.0)], 10.0, 15.0, 2)
    cpu["ms_per_request"] = {"stack_per_gateway_request": 0.5, "pod_per_request": 0.25,
                             "generator_per_request": None}
    phase = {"activator_added_ms": {"p50_ms": p50, "p95_ms": None, "p99_ms": p99}, "cpu": cpu,
             "generator_lag": dr.lag_summary([0.1, 2.0]),
             "paths": {dr.POD: {}, dr.PROXY: {}, dr.GATEWAY_DIRECT: {}}}
    out = dr.goal({"1000": phase}, 1000.0)
    assert out["met"] is met
    assert ("why_not" in out) is not met
    if not met:  # 2 gateway paths x 0.5 ms x 1,000/s; 3 paths x 0.25 ms x 1,000/s
        assert out["why_not"]["cores_needed_at_rate"] == {  # type: ignore[index]
            "gateway": 1.0, "pods": 0.75, "generator": None, "total": 1.75}
    assert cpu["percent_of_one_core"] == {"stack": 90.0}
    assert cpu["machine_busy_percent"] == 75.0
    assert cpu["others_percent_of_one_core"] == 60.0
