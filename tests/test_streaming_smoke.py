"""The streaming benchmark of issue 19 in a small configuration, end to end: `python -m
loadtests.streaming` starts its own stack, opens streamed chat completions at once to the
token pod at zero, and must lose none, never exceed container concurrency, measure time to
first token both ways (gateway and pod) and leave no process behind."""

from __future__ import annotations

from pathlib import Path

from tests.loadtestutil import run_quick

FIELDS = {"streams", "tokens_per_stream", "ok", "lost", "errors", "ttft_p50_ms", "ttft_p99_ms",
          "ttft_max_ms", "tokens_per_s", "wall_s", "max_pods", "cc_violations",
          "gateway_ttft_p50_ms", "direct_ttft_p50_ms", "activator_added_ttft_ms",
          "processes_left", "options", "json"}


def test_streaming_benchmark_quick_run_loses_no_stream(tmp_path: Path) -> None:
    result = run_quick("loadtests.streaming", tmp_path)
    assert set(result) == FIELDS
    assert result["streams"] == 20 and result["ok"] == 20 and result["lost"] == 0, result
    assert result["cc_violations"] == 0 and result["processes_left"] == 0
    assert result["max_pods"] >= 1 and result["tokens_per_s"] > 0
    assert result["ttft_p50_ms"] <= result["ttft_p99_ms"]
    assert result["activator_added_ttft_ms"] is not None
    assert Path(result["json"]).is_file()
