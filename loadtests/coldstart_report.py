"""What `loadtests.coldstart_parallel` measured, turned into numbers: per case (N services woken
at once) the time to first answer and the p95 of each cold-start stage from the activator's
`ColdStart` records, and the goals with met / not met. Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kernel.messages import ColdStart
from loadtests.report import percentile, rounded

STAGES = (
    "request_in->placement_decided",
    "placement_decided->weights_fetched",
    "weights_fetched->process_spawned",
    "process_spawned->ready",
    "ready->first_byte_out",
)
# The control plane's share of a cold start: everything but the pod's own start-up
# (`process_spawned -> ready` is the model server importing and loading) and the weights'
# download (`placement_decided -> weights_fetched`, storage's and the network's time).
CONTROL_PLANE = "control_plane"
CONTROL_PLANE_GOAL_MS = 50.0
FLOOR_FACTOR = 1.1
GOAL_SIZE = 25


@dataclass(frozen=True)
class Answer:
    """The client's view of one request: latency from send to the full answer."""

    service: str
    latency_ms: float
    status: int
    pod: str = ""
    error: str = ""


def control_plane_ms(cs: ColdStart) -> float:
    """`request_in -> process_spawned` plus `ready -> first_byte_out`, less the weights'
    fetch, in ms."""
    fetch = cs.fetched - cs.placement_decided
    return ((cs.process_spawned - cs.request_in) - fetch
            + (cs.first_byte_out - cs.ready)) * 1000.0


def stages(cs: ColdStart) -> dict[str, float]:
    out = {k: v for k, v in cs.stages_ms().items() if k in STAGES}
    out[CONTROL_PLANE] = round(control_plane_ms(cs), 1)
    out["total"] = cs.stages_ms()["total"]
    return out


def summarize_case(
    n: int, answers: Sequence[Answer], colds: Sequence[ColdStart], *, nodes: int,
    node_cpu: float, node_memory_mb: int, pod_cpu_s: float, cores: int,
) -> dict[str, object]:
    """One case: N services, N requests. `pod_cpu_s` is one pod's own CPU time to ready,
    so the CPU floor is what N such starts cost on `cores` cores, with nothing else."""
    lat = [a.latency_ms for a in answers if a.status == 200]
    per_stage: dict[str, list[float]] = {}
    for cs in colds:
        for k, v in stages(cs).items():
            per_stage.setdefault(k, []).append(v)
    errors: dict[str, int] = {}
    for a in answers:
        if a.status != 200:
            key = str(a.status) if a.status else a.error or "no answer"
            errors[key] = errors.get(key, 0) + 1
    floor_ms = n * pod_cpu_s * 1000.0 / cores
    return {
        "services": n,
        "nodes": nodes,
        "node_cpu": node_cpu,
        "node_memory_mb": node_memory_mb,
        "requests": len(answers),
        "ok": len(lat),
        "errors_by_status": dict(sorted(errors.items())),
        "p50_ms": rounded(percentile(lat, 50)),
        "p95_ms": rounded(percentile(lat, 95)),
        "max_ms": rounded(max(lat, default=None) if lat else None),
        "cold_start_records": len(colds),
        "stage_p95_ms": {k: rounded(percentile(v, 95)) for k, v in per_stage.items()},
        "stage_max_ms": {k: rounded(max(v)) for k, v in per_stage.items()},
        "cpu_floor_ms": round(floor_ms, 1),
    }


def goals(cases: Sequence[dict[str, object]], *, size: int = GOAL_SIZE) -> list[dict[str, object]]:
    """The issue's goals at `size` services: the control plane's share p95 <= 50 ms, and the
    total p95 within 1.1x of the CPU floor. Judged at the largest size run when `size` did
    not run (a quick run), and each goal says at which size it was judged."""
    if not cases:
        return []
    case = next((c for c in cases if c["services"] == size), None)
    if case is None:
        case = max(cases, key=lambda c: int(str(c["services"])))
    at = case["services"]
    stage_p95 = case["stage_p95_ms"]
    assert isinstance(stage_p95, dict)
    cp = stage_p95.get(CONTROL_PLANE)
    total = case["p95_ms"]
    floor = case["cpu_floor_ms"]
    assert isinstance(floor, float)
    bound = round(FLOOR_FACTOR * floor, 1)
    return [
        {
            "goal": f"control plane share p95 <= {CONTROL_PLANE_GOAL_MS:g} ms",
            "services": at,
            "value_ms": cp,
            "bound_ms": CONTROL_PLANE_GOAL_MS,
            "met": cp is not None and cp <= CONTROL_PLANE_GOAL_MS,
        },
        {
            "goal": f"total p95 <= {FLOOR_FACTOR:g} x CPU floor",
            "services": at,
            "value_ms": total,
            "bound_ms": bound,
            "met": isinstance(total, float) and total <= bound,
        },
    ]
