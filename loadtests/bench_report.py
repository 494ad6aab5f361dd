"""What a scheduler benchmark run measured, turned into numbers: each mode's summary, the
ratios between modes against the goals of issue 3, and the JSON + PNG written under `--out`.
The runs themselves are `loadtests/bench_schedule.py`'s business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kernel.messages import Placement, Unschedulable
from loadtests.bench_harness import MODES, BenchOptions, Drive, pct
from partitions.agents.sim import SimCluster

GOALS = {
    "throughput_ratio": 5.0,
    "p99_ratio": 0.2,
    "probes_per_placement": 0.2,
    "scaling_1_to_2": 1.7,
}


def summarize(mode: str, d: Drive, sim: SimCluster, schedulers: int) -> dict[str, Any]:
    placed = {r.pod: r.node for r in d.replies if isinstance(r, Placement)}
    unsched = sum(isinstance(r, Unschedulable) for r in d.replies)
    errors = [str(r) for r in d.replies if isinstance(r, Exception)]
    probes = sum(r.probes for r in d.replies if isinstance(r, Placement | Unschedulable))
    n = len(d.replies)
    started = sim.started_pods()
    # A pod running although its answer was not a Placement, or not where the answer said.
    ghosts = sum(
        1
        for r, q in zip(d.replies, d.pods, strict=True)
        if not isinstance(r, Placement) and q in started
    )
    misplaced = sum(1 for p, node in placed.items() if started.get(p) != node)
    return {
        "mode": mode,
        "schedulers": schedulers,
        "placements": n,
        "placed": len(placed),
        "unschedulable": unsched,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "placements_per_s": round(n / d.wall_s, 1) if d.wall_s else 0.0,
        "p50_ms": round(pct(d.latencies, 0.50) * 1000, 2),
        "p99_ms": round(pct(d.latencies, 0.99) * 1000, 2),
        "probes_per_placement": round(probes / n, 4) if n else 0.0,
        "overcommitted_nodes": len(sim.overcommitted_nodes()),
        # each placement answered once and started exactly where the answer says
        "placements_match_sim": placed == started,
        "ghost_pods": ghosts,
        "misplaced_pods": misplaced,
        "duplicate_starts": sim.stats.duplicate_starts,
        "node_refusals": sim.stats.refused_fit + sim.stats.refused_fence,
        "cached_model_hits": round(sim.stats.warm_starts / max(1, len(placed)), 3),
        "wall_s": round(d.wall_s, 2),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def ratios(out: dict[str, Any]) -> dict[str, Any]:
    p, c, s = out.get("partitioned"), out.get("central"), out.get("sampling")
    r: dict[str, Any] = {}
    if p and c:
        r["throughput_partitioned_over_central"] = ratio(
            p["placements_per_s"], c["placements_per_s"]
        )
        r["p99_partitioned_over_central"] = ratio(p["p99_ms"], c["p99_ms"])
        r["p50_partitioned_over_central"] = ratio(p["p50_ms"], c["p50_ms"])
        if "at_rate" in p and "at_rate" in c:
            r["p99_at_rate_partitioned_over_central"] = ratio(
                p["at_rate"]["p99_ms"], c["at_rate"]["p99_ms"]
            )
    if p and s:
        r["throughput_partitioned_over_sampling"] = ratio(
            p["placements_per_s"], s["placements_per_s"]
        )
        r["probes_partitioned_over_sampling"] = ratio(
            p["probes_per_placement"], s["probes_per_placement"]
        )
    sc = out.get("scaling")
    if sc and "1" in sc and "2" in sc:
        r["scaling_1_to_2"] = ratio(sc["2"]["placements_per_s"], sc["1"]["placements_per_s"])
    return r


def goals(out: dict[str, Any]) -> dict[str, Any]:
    r, p = out["ratios"], out.get("partitioned") or {}
    runs = [v for k, v in out.items() if k in MODES] + list((out.get("scaling") or {}).values())

    def at_least(v: float | None, goal: float) -> bool | None:
        return None if v is None else v >= goal

    def at_most(v: float | None, goal: float) -> bool | None:
        return None if v is None else v <= goal

    return {
        "throughput_ge_5x_central": at_least(
            r.get("throughput_partitioned_over_central"), GOALS["throughput_ratio"]
        ),
        "p99_le_one_fifth_of_central": at_most(
            r.get("p99_partitioned_over_central"), GOALS["p99_ratio"]
        ),
        "p99_at_same_rate_le_one_fifth_of_central": at_most(
            r.get("p99_at_rate_partitioned_over_central"), GOALS["p99_ratio"]
        ),
        "probes_le_0.2_per_placement": at_most(
            p.get("probes_per_placement"), GOALS["probes_per_placement"]
        ),
        "scaling_1_to_2_ge_1.7": at_least(r.get("scaling_1_to_2"), GOALS["scaling_1_to_2"]),
        "no_overcommit_anywhere": all(v["overcommitted_nodes"] == 0 for v in runs),
        "every_placement_answered_once": all(
            v["placed"] + v["unschedulable"] == v["placements"] and v["placements_match_sim"]
            for v in runs
        ),
    }


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in out]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    a.bar(modes, [out[m]["placements_per_s"] for m in modes], color=["C0", "C1", "C2"])
    a.set_ylabel("placements / s")
    a.set_title(f"{out['config']['nodes']} nodes, {out['config']['fill']:.0%} fill")
    x = range(len(modes))
    bars = [
        ("p50", lambda r: r["p50_ms"]),
        ("p99", lambda r: r["p99_ms"]),
        ("p99 at fixed rate", lambda r: r.get("at_rate", {}).get("p99_ms", 0)),
    ]
    for j, (label, get) in enumerate(bars):
        b.bar([i + (j - 1) * 0.27 for i in x], [get(out[m]) for m in modes], 0.27, label=label)
    b.set_xticks(list(x), modes)
    b.set_yscale("log")
    b.set_ylabel("placement latency (ms)")
    b.legend()
    sc = out.get("scaling") or {}
    ks = sorted(sc, key=int)
    c.plot([int(k) for k in ks], [sc[k]["placements_per_s"] for k in ks], "o-")
    c.set_xlabel("schedule instances (partitions)")
    c.set_ylabel("placements / s")
    c.set_title(f"scaling 1→2: {out['ratios'].get('scaling_1_to_2')}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    out: dict[str, Any], opts: BenchOptions, stem: str, plotter: Any = plot
) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    png, js = opts.out / f"{stem}.png", opts.out / f"{stem}.json"
    out["files"] = {"json": str(js), "png": str(png) if opts.plot else ""}
    if opts.plot:
        plotter(out, png)
    js.write_text(json.dumps(out, indent=2) + "\n")
    return out
