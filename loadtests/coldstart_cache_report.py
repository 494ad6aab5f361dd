"""What `loadtests.coldstart` measured, turned into numbers: per scenario (no cache, cache hit,
prefetched, and the cycling scenario with locality on / off) the total cold start p50/p99, the
mean, the cache hit rate and the p50 of each stage from the activator's `ColdStart` records;
and the issue's goals, met or not. Pure: no I/O, no clock."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kernel.messages import ColdStart
from loadtests.coldstart_report import stages
from loadtests.report import percentile, rounded

CACHED_RATIO_GOAL = 0.4  # a cached cold start's total <= 40% of an uncached one's
LOCALITY_CUT_GOAL = 0.5  # locality on: the cycling scenario's mean total <= half of off's


@dataclass(frozen=True)
class Wake:
    """One scale-from-zero cycle: the client's answer, the cold start record, and whether
    the node the pod landed on held the model before the request (a cache hit)."""

    service: str
    model: str
    status: int
    latency_ms: float
    hit: bool
    cold: ColdStart | None


def summarize(wakes: Sequence[Wake]) -> dict[str, object]:
    totals = [w.cold.stages_ms()["total"] for w in wakes if w.cold is not None]
    per_stage: dict[str, list[float]] = {}
    for w in wakes:
        if w.cold is not None:
            for k, v in stages(w.cold).items():
                per_stage.setdefault(k, []).append(v)
    nodes: dict[str, int] = {}
    for w in wakes:
        if w.cold is not None:
            nodes[w.cold.node] = nodes.get(w.cold.node, 0) + 1
    return {
        "cycles": len(wakes),
        "ok": sum(w.status == 200 for w in wakes),
        "statuses": sorted({w.status for w in wakes}),
        "cold_start_records": len(totals),
        "cache_hits": sum(w.hit for w in wakes),
        "cache_hit_rate": rounded(sum(w.hit for w in wakes) / len(wakes), 3) if wakes else None,
        "total_p50_ms": rounded(percentile(totals, 50)),
        "total_p99_ms": rounded(percentile(totals, 99)),
        "total_mean_ms": rounded(statistics.fmean(totals)) if totals else None,
        "client_p50_ms": rounded(percentile([w.latency_ms for w in wakes], 50)),
        "stage_p50_ms": {k: rounded(percentile(v, 50)) for k, v in per_stage.items()},
        "pods_per_node": dict(sorted(nodes.items())),
    }


def _ratio(a: object, b: object) -> float | None:
    if not isinstance(a, float) or not isinstance(b, float) or b <= 0:
        return None
    return round(a / b, 3)


def goals(scenarios: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """The issue's two goals. The cached one compares p50 totals (cache hit on the chosen
    node against no cache, same run); the locality one the cycling scenario's mean totals."""
    cached = _ratio(scenarios["cache_hit"]["total_p50_ms"], scenarios["no_cache"]["total_p50_ms"])
    prefetched = _ratio(scenarios["prefetched"]["total_p50_ms"],
                        scenarios["no_cache"]["total_p50_ms"])
    cut = _ratio(scenarios["cycling_locality_on"]["total_mean_ms"],
                 scenarios["cycling_locality_off"]["total_mean_ms"])
    return {
        "cached_total_vs_uncached": {
            "target": f"cache hit total p50 <= {CACHED_RATIO_GOAL:g} x no-cache total p50",
            "target_ratio": CACHED_RATIO_GOAL,
            "measured_ratio": cached,
            "prefetched_ratio": prefetched,
            "met": cached is not None and cached <= CACHED_RATIO_GOAL,
        },
        "locality_cuts_cycling_mean": {
            "target": f"cycling mean total, locality on <= {LOCALITY_CUT_GOAL:g} x off",
            "target_ratio": LOCALITY_CUT_GOAL,
            "measured_ratio": cut,
            "met": cut is not None and cut <= LOCALITY_CUT_GOAL,
        },
    }
