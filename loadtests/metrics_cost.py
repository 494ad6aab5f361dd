"""What metrics cost (issue 17): `loadtests.burst` p50 and `loadtests.bench_schedule`
placements/s with metrics on and off, in one run. Off is `FNPLANE_METRICS=off`, which makes
every component's `Metrics` a no-op and leaves traces as they are (kernel/metrics.py
`disabled()`; the standard `OTEL_SDK_DISABLED=true` would turn traces off too, and the
difference would be theirs as much as the metrics'). Each measurement is a fresh process of
its benchmark, so nothing of one configuration warms the other.

    python -m loadtests.metrics_cost --json                # 3 alternations, < 10 min
    python -m loadtests.metrics_cost --quick --json        # the smoke test's size

The machine is shared and noisy, so the configurations alternate (on, off, off, on, on, off…:
an ABBA order, so a drift in the machine's load falls on both alike) and each figure is the
median of its runs. The ratio is on/off; the goal is within 5% either way (a configuration
that is much *faster* with metrics on says the runs differ in something else: the burst's
whole-burst p50 swings between ~70 and ~700 ms with how many pods the first scale decision
asks for, which a 50 ms stall in the first requests' arrival, a full garbage collection say,
decides; `first_cold_start_ms` per run shows it). Prints ONE JSON object and writes it under
`--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.05

# Each benchmark as a command, and which of its JSON figures count (higher_is_better says
# which way "within 5%" points). The burst's `p50_ms` is the whole burst's (cold start
# included); `proxy_p50_ms` is a warm request through the activator one at a time, where a
# per-request metrics cost would show most plainly.
BURST_FULL = ["--requests", "600", "--concurrency", "100", "--latency-pairs", "150"]
BURST_QUICK = ["--requests", "60", "--concurrency", "20", "--latency-pairs", "10",
               "--max-scale", "2"]
SCHEDULE_FULL = ["--nodes", "2000", "--placements", "6000", "--modes", "partitioned",
                 "--no-scaling", "--no-skewed", "--no-churn", "--no-model", "--rate", "0"]
SCHEDULE_QUICK = ["--nodes", "200", "--placements", "300", "--modes", "partitioned",
                  "--no-scaling", "--no-skewed", "--no-churn", "--no-model", "--rate", "0",
                  "--quick"]
FIGURES: dict[str, list[tuple[str, tuple[str, ...], bool]]] = {
    "burst": [("p50_ms", ("p50_ms",), False), ("proxy_p50_ms", ("proxy_p50_ms",), False)],
    # CPU per placement in the schedule processes: what metrics add there, read from
    # process times, which the machine's other work does not move as it moves throughput.
    "schedule": [("placements_per_s", ("partitioned", "placements_per_s"), True),
                 ("scheduler_cpu_ms_per_placement",
                  ("partitioned", "cpu_ms_per_placement", "schedulers"), False)],
}
MODULES = {"burst": "loadtests.burst", "schedule": "loadtests.bench_schedule"}


def order(alternations: int) -> list[bool]:
    """Metrics on (True) or off per run: ABBA blocks, so a linear drift cancels out."""
    runs: list[bool] = []
    for i in range(alternations):
        runs += [True, False] if i % 2 == 0 else [False, True]
    return runs


def _dig(doc: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def run_one(bench: str, args: list[str], metrics_on: bool, out: Path,
            timeout_s: float) -> dict[str, Any]:
    """One run of one benchmark as its own process; its figures, or why there are none."""
    env = dict(os.environ)
    env.pop("OTEL_SDK_DISABLED", None)
    env.pop("FNPLANE_METRICS", None)
    if not metrics_on:
        env["FNPLANE_METRICS"] = "off"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", MODULES[bench], "--json", *args, "--out", str(out)]
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    took = round(time.monotonic() - t0, 1)
    if run.returncode != 0 and not run.stdout.strip():
        return {"metrics": metrics_on, "error": f"exit {run.returncode}: {run.stderr[-800:]}",
                "took_s": took}
    doc = json.loads(run.stdout)
    got: dict[str, Any] = {"metrics": metrics_on, "took_s": took}
    for name, path, _ in FIGURES[bench]:
        got[name] = _dig(doc, path)
    if bench == "burst":
        got["lost"] = doc.get("lost")
        got["first_cold_start_ms"] = doc.get("first_cold_start_ms")
    return got


def compare(bench: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per configuration, the on/off ratio and whether it is within the goal."""
    out: dict[str, Any] = {}
    for name, _, higher_is_better in FIGURES[bench]:
        on = [r[name] for r in runs if r["metrics"] and r.get(name) is not None]
        off = [r[name] for r in runs if not r["metrics"] and r.get(name) is not None]
        fig: dict[str, Any] = {"on": on, "off": off}
        if on and off:
            m_on, m_off = statistics.median(on), statistics.median(off)
            ratio = m_on / m_off if m_off else None
            fig.update(median_on=round(m_on, 3), median_off=round(m_off, 3),
                       ratio_on_off=None if ratio is None else round(ratio, 4))
            if ratio is not None:
                fig["within_5pct"] = abs(ratio - 1) <= GOAL
                fig["metrics_cost_pct"] = round(
                    100 * ((1 - ratio) if higher_is_better else (ratio - 1)), 2)
        out[name] = fig
    return out


def run(alternations: int, benches: list[str], quick: bool, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"alternations": alternations, "order": order(alternations),
                              "quick": quick, "cpus": os.cpu_count(),
                              "loadavg_before": os.getloadavg()}
    for bench in benches:
        args = {"burst": BURST_QUICK if quick else BURST_FULL,
                "schedule": SCHEDULE_QUICK if quick else SCHEDULE_FULL}[bench]
        runs = []
        for i, on in enumerate(result["order"]):
            where = out / f"{bench}-{i}-{'on' if on else 'off'}"
            runs.append(run_one(bench, args, on, where, timeout_s=300.0))
            print(f"[metrics_cost] {bench} run {i} metrics={'on' if on else 'off'}: "
                  f"{runs[-1]}", file=sys.stderr, flush=True)
        result[bench] = {"args": args, "runs": runs, **compare(bench, runs)}
    result["loadavg_after"] = os.getloadavg()
    verdicts = [fig["within_5pct"] for bench in benches for name, _, _ in FIGURES[bench]
                if "within_5pct" in (fig := result[bench][name])]
    result["within_5pct"] = bool(verdicts) and all(verdicts)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics_cost.json"
    result["json"] = str(path)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.metrics_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alternations", type=int, default=None,
                   help="on/off pairs per benchmark (default 3; quick 1)")
    p.add_argument("--only", choices=sorted(MODULES), action="append",
                   help="one benchmark (repeatable; default both)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "out" / "metrics_cost")
    a = p.parse_args(argv)
    alternations = a.alternations or (1 if a.quick else 3)
    result = run(alternations, a.only or ["burst", "schedule"], a.quick, a.out.resolve())
    print(json.dumps(result, indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
