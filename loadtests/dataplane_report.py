"""What the dataplane probe (`loadtests.dataplane`) measured, turned into numbers: per path and
rate the latency percentiles and errors, the activator's added latency over calling the pod
itself, the generator's lag, CPU shares, and whether the goal of issue 11 is met. Pure
functions over the load generators' documents and CPU readings; no I/O, no clock."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loadtests.report import percentile, rounded

# The three paths, in the order arrivals rotate over them.
POD = "direct-to-pod"  # the client calls the pod's own URL: the baseline
PROXY = "activator-proxy"  # through the gateway, buffer and throttler (TBC -1)
GATEWAY_DIRECT = "gateway-direct"  # through the gateway in direct mode (TBC 0)
PATHS = (POD, PROXY, GATEWAY_DIRECT)
# X-Fnplane-Path each path must answer with ("-": no header, the pod's own answer).
EXPECTED_HEADER = {POD: "-", PROXY: "activator", GATEWAY_DIRECT: "direct"}

# Issue 11's goal, at the highest rate: what the activator may add over the pod itself.
GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_P99_MS = 5.0
PCTS = (50, 95, 99)


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds of one process (user + system) over the measured window."""

    role: str  # generator | stack | pod | nats-server | redis-server
    name: str
    cpu_s: float


def merge_clients(docs: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The documents of the generator processes that shared one schedule, as one."""
    paths: dict[str, dict[str, object]] = {}
    lag: list[float] = []
    cpu = 0.0
    for doc in docs:
        lag.extend(doc["lag_ms"])  # type: ignore[arg-type]
        cpu += float(doc["cpu_s"])  # type: ignore[arg-type]
        for name, rec in doc["paths"].items():  # type: ignore[attr-defined]
            into = paths.setdefault(name, {"latency_ms": [], "service_ms": [],
                                           "status": Counter(), "path_header": Counter(),
                                           "errors": Counter()})
            for key in ("latency_ms", "service_ms"):
                into[key].extend(rec[key])  # type: ignore[attr-defined]
            for key in ("status", "path_header", "errors"):
                into[key].update(rec[key])  # type: ignore[attr-defined]
    windows = [doc["window"] for doc in docs]
    start = min(w[0] for w in windows)  # type: ignore[index]
    end = max(w[1] for w in windows)  # type: ignore[index]
    return {"paths": paths, "lag_ms": lag, "cpu_s": cpu, "window": [start, end]}


def summarize_path(name: str, rec: Mapping[str, object], duration_s: float) -> dict[str, object]:
    latency: list[float] = rec["latency_ms"]  # type: ignore[assignment]
    service: list[float] = rec["service_ms"]  # type: ignore[assignment]
    status: Counter[str] = Counter(rec["status"])  # type: ignore[arg-type]
    errors: Counter[str] = Counter(rec["errors"])  # type: ignore[arg-type]
    headers: dict[str, int] = dict(rec["path_header"])  # type: ignore[arg-type]
    ok = status.get("200", 0)
    bad = {f"http_{k}": v for k, v in status.items() if k != "200"}
    bad.update(errors)
    want = EXPECTED_HEADER.get(name)
    out: dict[str, object] = {
        "requests": len(latency),
        "ok": ok,
        "errors": sum(bad.values()),
        "errors_by_kind": dict(sorted(bad.items())),
        "achieved_rps": round(len(latency) / duration_s, 1) if duration_s > 0 else None,
        "path_header": headers,
        "wrong_path": sum(v for k, v in headers.items() if want is not None and k != want),
    }
    for p in PCTS:
        out[f"p{p}_ms"] = rounded(percentile(latency, p), 2)
    out["max_ms"] = rounded(max(latency, default=None), 2)
    out["service_p50_ms"] = rounded(percentile(service, 50), 2)
    out["service_p99_ms"] = rounded(percentile(service, 99), 2)
    return out


def added(paths: Mapping[str, Mapping[str, object]], via: str) -> dict[str, float | None]:
    """What path `via` adds over calling the pod itself, percentile by percentile."""
    out: dict[str, float | None] = {}
    for p in PCTS:
        base, got = paths.get(POD, {}).get(f"p{p}_ms"), paths.get(via, {}).get(f"p{p}_ms")
        ok = isinstance(base, float | int) and isinstance(got, float | int)
        out[f"p{p}_ms"] = round(float(got) - float(base), 2) if ok else None  # type: ignore[arg-type]
    return out


def lag_summary(lag_ms: Sequence[float]) -> dict[str, object]:
    """How late the generator sent, against its schedule; latency already includes it."""
    n = len(lag_ms)
    return {
        "p50_ms": rounded(percentile(lag_ms, 50), 2),
        "p99_ms": rounded(percentile(lag_ms, 99), 2),
        "max_ms": rounded(max(lag_ms, default=None), 2),
        "late_over_1ms": round(sum(1 for x in lag_ms if x > 1.0) / n, 4) if n else None,
        "late_over_10ms": round(sum(1 for x in lag_ms if x > 10.0) / n, 4) if n else None,
    }


def cpu_summary(readings: Sequence[CpuReading], wall_s: float,
                machine_busy_s: float | None, cores: int) -> dict[str, object]:
    """CPU per role as percent of one core over the window (100 = one core busy); what the
    machine's cores did besides (other people's processes on a shared machine) is reported
    too, since it competes with ours."""
    by_role: dict[str, float] = {}
    for r in readings:
        by_role[r.role] = by_role.get(r.role, 0.0) + r.cpu_s

    def pct(cpu_s: float) -> float:
        return round(100.0 * cpu_s / wall_s, 1) if wall_s > 0 else 0.0

    ours = sum(r.cpu_s for r in readings)
    known = machine_busy_s is not None and wall_s > 0
    return {
        "window_s": round(wall_s, 2),
        "cores": cores,
        "percent_of_one_core": {role: pct(s) for role, s in sorted(by_role.items())},
        "per_process": {f"{r.role}:{r.name}": pct(r.cpu_s) for r in readings},
        # All processes of the machine, ours and others', as percent of all its cores.
        "machine_busy_percent": (round(100.0 * machine_busy_s / (wall_s * cores), 1)  # type: ignore[operator]
                                 if known else None),
        # Processes not of this probe (percent of one core): contention it did not cause.
        "others_percent_of_one_core": (pct(max(0.0, machine_busy_s - ours))  # type: ignore[operator]
                                       if known else None),
    }


def cpu_per_request(readings: Sequence[CpuReading], paths: Mapping[str, Mapping[str, object]],
                    *, stack_idle_s: float = 0.0) -> dict[str, float | None]:
    """CPU milliseconds per request each role spent: the gateway's per request through it
    (proxy and gateway-direct), the pods' and the generators' per request of any path. On a
    shared machine this moves far less than latency does with other people's load. The
    stack also runs the control plane, whose CPU at rest over the same window
    (`stack_idle_s`) is taken out of the `_net` figure."""
    def n(*names: str) -> int:
        return sum(int(paths[p]["requests"]) for p in names if p in paths)  # type: ignore[call-overload]

    def per(role: str, requests: int) -> float | None:
        cpu = sum(r.cpu_s for r in readings if r.role == role)
        return round(1000.0 * cpu / requests, 3) if requests else None

    gateway = n(PROXY, GATEWAY_DIRECT)
    stack = sum(r.cpu_s for r in readings if r.role == "stack")
    return {"stack_per_gateway_request": per("stack", gateway),
            "stack_per_gateway_request_net": (round(1000.0 * max(0.0, stack - stack_idle_s)
                                                    / gateway, 3) if gateway else None),
            "pod_per_request": per("pod", n(*PATHS)),
            "generator_per_request": per("generator", n(*PATHS))}


def cores_needed(phase: Mapping[str, object], rate: float) -> dict[str, float | None]:
    """What `rate` per path would take in CPU, in cores, at the CPU per request measured in
    `phase` (a lower rate, where the machine kept up): every path's request costs the
    generator and a pod, the two gateway paths cost the gateway (one process: at most one
    core, whatever the machine has)."""
    per: Mapping[str, float | None] = phase["cpu"]["ms_per_request"]  # type: ignore[index]
    n_gateway = sum(1 for p in (PROXY, GATEWAY_DIRECT) if p in phase["paths"])  # type: ignore[operator]
    n_all = len(phase["paths"])  # type: ignore[arg-type]

    def cores(ms: float | None, paths: int) -> float | None:
        return None if ms is None else round(ms / 1000.0 * rate * paths, 2)

    out = {"gateway": cores(per.get("stack_per_gateway_request"), n_gateway),
           "pods": cores(per.get("pod_per_request"), n_all),
           "generator": cores(per.get("generator_per_request"), n_all)}
    known = [v for v in out.values() if v is not None]
    out["total"] = round(sum(known), 2) if known else None
    return out


def goal(rates: Mapping[str, Mapping[str, object]], top_rate: float) -> dict[str, object]:
    """Issue 11's goal at the highest rate: the activator (proxy mode) adds at most 1 ms p50
    and 5 ms p99 over calling the pod. Where it is not met, the CPU figures say why."""
    phase = rates.get(f"{top_rate:g}")
    if phase is None:
        return {"rate_qps": top_rate, "met": False, "why_not": "no measurement at this rate"}
    add: Mapping[str, float | None] = phase["activator_added_ms"]  # type: ignore[assignment]
    p50, p99 = add.get("p50_ms"), add.get("p99_ms")
    p50_ok = p50 is not None and p50 <= GOAL_ADDED_P50_MS
    p99_ok = p99 is not None and p99 <= GOAL_ADDED_P99_MS
    out: dict[str, object] = {
        "rate_qps": top_rate,
        "added_p50_ms": p50,
        "added_p50_goal_ms": GOAL_ADDED_P50_MS,
        "added_p50_met": p50_ok,
        "added_p99_ms": p99,
        "added_p99_goal_ms": GOAL_ADDED_P99_MS,
        "added_p99_met": p99_ok,
        "met": p50_ok and p99_ok,
    }
    if not out["met"]:
        low = rates[min(rates, key=float)]
        cpu: Mapping[str, object] = phase["cpu"]  # type: ignore[assignment]
        lag: Mapping[str, object] = phase["generator_lag"]  # type: ignore[assignment]
        out["why_not"] = {
            "cpu_percent_of_one_core": cpu["percent_of_one_core"],
            "machine_busy_percent": cpu["machine_busy_percent"],
            "others_percent_of_one_core": cpu["others_percent_of_one_core"],
            "cores": cpu["cores"],
            "generator_lag": lag,
            "cores_needed_at_rate": cores_needed(low, top_rate),
            "note": ("the generator, the gateway (with the control plane: 'stack') and the "
                     "pods share the machine's cores; a gateway process near 100% of one "
                     "core queues requests on its event loop, which shows as tail latency "
                     "on the activator paths only"),
        }
    return out
