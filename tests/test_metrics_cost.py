"""The metrics-cost comparison (issue 17) in a small configuration: `python -m
loadtests.metrics_cost` runs a benchmark with metrics on and off, alternating, and prints one
JSON object with every run's figures, the medians and their ratio. Its speed is not asserted
(the smoke size says nothing of it); its shape and arithmetic are, table-driven."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtests.metrics_cost import compare, order
from tests.loadtestutil import run_quick


@pytest.mark.timeout(60)
def test_one_alternation_measures_metrics_on_and_off(tmp_path: Path) -> None:
    out = run_quick("loadtests.metrics_cost", tmp_path, "--only", "schedule")
    assert out["order"] == [True, False]
    runs = out["schedule"]["runs"]
    assert [r["metrics"] for r in runs] == [True, False]
    assert all(r["placements_per_s"] > 0 and r["scheduler_cpu_ms_per_placement"] > 0
               for r in runs), runs
    fig = out["schedule"]["placements_per_s"]
    assert fig["ratio_on_off"] == pytest.approx(fig["median_on"] / fig["median_off"], rel=1e-3)
    assert isinstance(fig["within_5pct"], bool)
    assert Path(out["json"]).is_file()


def test_the_order_alternates_in_abba_blocks() -> None:
    assert order(1) == [True, False]
    assert order(3) == [True, False, False, True, True, False]
    assert order(4).count(True) == order(4).count(False) == 4


def _runs(bench: str, on: list[float], off: list[float]) -> list[dict[str, Any]]:
    name = "placements_per_s" if bench == "schedule" else "p50_ms"
    return ([{"metrics": True, name: v} for v in on]
            + [{"metrics": False, name: v} for v in off])


@pytest.mark.parametrize(("bench", "name", "on", "off", "ratio", "within"), [
    # Within 5% either way: much faster with metrics on means the runs differ otherwise.
    ("schedule", "placements_per_s", [960, 1000, 5000], [1000, 1000, 10], 1.0, True),
    ("schedule", "placements_per_s", [940], [1000], 0.94, False),
    ("schedule", "placements_per_s", [1040], [1000], 1.04, True),
    ("schedule", "placements_per_s", [1200], [1000], 1.2, False),
    ("burst", "p50_ms", [10.4, 10.45, 99.0], [10.0, 10.0, 1.0], 1.045, True),
    ("burst", "p50_ms", [10.6], [10.0], 1.06, False),
    ("burst", "p50_ms", [9.0], [10.0], 0.9, False),
])
def test_medians_ratio_and_verdict(bench: str, name: str, on: list[float], off: list[float],
                                   ratio: float, within: bool) -> None:
    fig = compare(bench, _runs(bench, on, off))[name]
    assert fig["ratio_on_off"] == pytest.approx(ratio, abs=1e-3)
    assert fig["within_5pct"] is within
    # The cost in percent: placements/s lost, or p50 added.
    cost = (1 - ratio) if name == "placements_per_s" else (ratio - 1)
    assert fig["metrics_cost_pct"] == pytest.approx(100 * cost, abs=0.1)


def test_a_run_without_a_figure_is_left_out_of_the_medians() -> None:
    runs = [{"metrics": True, "p50_ms": None, "error": "exit 1"}, {"metrics": True,
            "p50_ms": 2.0}, {"metrics": False, "p50_ms": 2.0}]
    fig = compare("burst", runs)["p50_ms"]
    assert fig["on"] == [2.0] and fig["ratio_on_off"] == 1.0
