"""The model-cache cold-start benchmark of issue 15 at its quick size, end to end: `python -m
loadtests.coldstart --quick` serves a few-MB model over local HTTP, runs every scenario on real
stacks, must answer every request with a 200, read every stage, count the cache hits where the
scenario makes them certain, print one JSON object, write its plot and leave no process
behind. Correctness only: no figure is judged for speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.coldstart_report import CONTROL_PLANE, STAGES
from tests.loadtestutil import run_quick

TOP = {"model_bytes", "mbps", "transfer_ms", "http_gets", "cycling_order", "load_avg_1m",
       "scenarios", "goals", "processes_left", "plots", "json", "options"}
SCENARIOS = ["no_cache", "cache_hit", "prefetched", "cycling_locality_on",
             "cycling_locality_off"]
SCENARIO = {"cycles", "ok", "statuses", "cold_start_records", "cache_hits", "cache_hit_rate",
            "total_p50_ms", "total_p99_ms", "total_mean_ms", "client_p50_ms", "stage_p50_ms",
            "pods_per_node"}
STAGE_KEYS = {*STAGES, CONTROL_PLANE, "total"}


@pytest.mark.timeout(60)
def test_quick_cache_cold_starts_answer_every_request_and_count_hits(tmp_path: Path) -> None:
    out = run_quick("loadtests.coldstart", tmp_path)

    assert TOP <= out.keys(), f"missing: {TOP - out.keys()}"
    assert list(out["scenarios"]) == SCENARIOS
    cycles = {"no_cache": 2, "cache_hit": 2, "prefetched": 2, "cycling_locality_on": 4,
              "cycling_locality_off": 4}
    for name, s in out["scenarios"].items():
        assert SCENARIO <= s.keys(), f"{name} missing: {SCENARIO - s.keys()}"
        assert s["cycles"] == s["ok"] == s["cold_start_records"] == cycles[name], name
        assert s["statuses"] == [200], name
        assert STAGE_KEYS <= s["stage_p50_ms"].keys(), name
        assert 0 < s["total_p50_ms"] <= s["total_p99_ms"], name
    sc = out["scenarios"]
    assert sc["no_cache"]["cache_hits"] == 0  # a fresh version each cycle: always fetched
    assert sc["cache_hit"]["cache_hits"] == 2
    assert sc["prefetched"]["cache_hits"] == 2
    # Seeded caches hold every model on some node: locality finds it every time. Off, best
    # fit sends all to node-0, which holds one of the two and must fetch the other.
    assert sc["cycling_locality_on"]["cache_hits"] == 4
    assert sc["cycling_locality_off"]["pods_per_node"] == {"node-0": 4}
    assert sc["cycling_locality_off"]["cache_hits"] < 4
    assert sorted(out["cycling_order"]) == [0, 0, 1, 1]
    for goal in out["goals"].values():
        assert {"target", "target_ratio", "measured_ratio", "met"} <= goal.keys()
        assert isinstance(goal["met"], bool) and goal["measured_ratio"] > 0
    assert out["processes_left"] == 0
    assert json.loads((tmp_path / "coldstart_cache.json").read_text()) == out
    for plot in out["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
