"""A discrete-event model of the placement path, fed with CPU costs this run measured, to say
what 2 cores cannot show: throughput and p99 for 1-64 instances and 5k-100k nodes.

Calibration (5,000 nodes, the main runs only): per placement, the CPU of each process group
(driver+sim, NATS server, schedulers) per mode; per applied event, the schedulers' CPU and the
CPU the event costs everywhere else (its sender, NATS, the sim) — churn, status updates alone.
How a scheduler's cost grows is structural, not fitted point by point: `central` scans n nodes,
`kube-scheduler` examines ~numFeasibleNodesToFind(n) nodes, the indexed modes bisect (their
cost taken as constant); the per-node part is what the mode costs above `central-indexed` at
5,000 nodes. A partitioned instance costs what one central-indexed process costs (same index)
plus a share that grows linearly with instances, fitted between `central-indexed` and the main
run's instance count: so 1 and 2 instances are predicted, not measured into the model. And the
cores this machine really gives the run (`cores_effective`: two vCPUs that may be hyperthreads
of one core, other tenants): placements/s × CPU per placement of the fitted runs, their median.

The simulation: a closed loop of `concurrency` placements (or an open loop at a rate, evenly
spaced as the benchmark sends them); each placement visits driver → NATS → one scheduler
instance → NATS → driver; every process runs one stage at a time (Python: one core each; the
NATS server many), sharing the machine's cores. Pod events are keyed by partition, so an
instance applies its nodes' share of them, which stretches its placements' service time by
1/(1 - event utilisation); what events cost outside the schedulers takes cores from everyone.

Validation: points not used in calibration — other cluster sizes, 1 and 2 instances, churn
runs, a churn rate not calibrated on — each with `error_pct`. Projection: a core per process,
driver and sim removed (clients and nodes are other machines), `projected: true` on every
figure.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functions.schedule.baselines import feasible_to_find

CAL_NODES = 5000
HOP_MS = 0.15  # one NATS hop's latency with the server idle (assumption, not measured)
LIFECYCLE_EVENTS = 4  # starting, ready, terminating, stopped per placement
P99_TARGET_MS = 50.0


@dataclass(frozen=True)
class Costs:
    """CPU ms per placement by group, and per applied event per scheduler instance."""

    driver: float
    nats: float
    sched: float
    event: float = 0.0  # a scheduler's CPU to apply one event
    bg_event: float = 0.0  # CPU one event costs outside the schedulers (sender, NATS, sim)


def calibrate(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per mode: driver, nats, sched_a (fixed), sched_b (per unit of scan work), sched_k (per
    instance beyond the first), event and bg_event."""
    cal: dict[str, dict[str, float]] = {}
    ref = out.get("central-indexed")
    base = ref["cpu_ms_per_placement"]["schedulers"] if ref else 0.0
    churn = out.get("churn") or {}
    for mode in ("partitioned", "central-indexed", "kube-scheduler", "central", "sampling"):
        row = out.get(mode)
        if not row:
            continue
        cpu = row["cpu_ms_per_placement"]
        sched = cpu.get("schedulers", 0.0)
        a, b, per_k = sched, 0.0, 0.0
        k = row.get("schedulers", 1)
        if mode in ("central", "kube-scheduler") and ref:
            a = base
            b = max(0.0, sched - base) / work(mode, CAL_NODES)
        if mode == "partitioned" and ref and k > 1:
            a, per_k = base, max(0.0, sched - base) / (k - 1)
        ch = churn.get(mode) or {}
        ev = ch.get("sched_cpu_ms_per_applied_event") or 0.0
        per_event = ch.get("cpu_ms_per_applied_event") or {}
        bg = sum(v for g, v in per_event.items() if g != "schedulers")
        cal[mode] = {"driver": cpu.get("driver_and_sim", 0.0), "nats": cpu.get("nats_server", 0.0),
                     "sched_a": a, "sched_b": b, "sched_k": per_k, "event": ev, "bg_event": bg,
                     "instances": k}  # fmt: skip
    return cal


def cores_effective(out: dict[str, Any], cal: dict[str, dict[str, float]]) -> float:
    """The cores the machine gives the run when every core is busy: placements/s × CPU
    s/placement of the fitted closed-loop runs, the most any of them got (a run bound by one
    process — a full-scan scheduler at 100% of one core — says nothing about the machine).
    Two vCPUs are not two cores' worth when they are one core's hyperthreads, or when another
    tenant runs; this is the one machine figure the model is fitted to."""
    used = [out[m]["placements_per_s"] * sum(out[m]["cpu_ms_per_placement"].values()) / 1000.0
            for m in cal if out.get(m, {}).get("placements_per_s")]
    return round(max(used), 3) if used else 2.0


def work(mode: str, nodes: int) -> float:
    if mode == "central":
        return float(nodes)
    if mode == "kube-scheduler":
        return float(feasible_to_find(nodes))
    return 0.0


def costs(cal: dict[str, float], mode: str, nodes: int, instances: int = 1) -> Costs:
    return Costs(driver=cal["driver"], nats=cal["nats"],
                 sched=cal["sched_a"] + cal["sched_b"] * work(mode, nodes)
                 + cal.get("sched_k", 0.0) * (instances - 1),
                 event=cal["event"], bg_event=cal.get("bg_event", 0.0))


def simulate(
    c: Costs, *, instances: int, cores: float, concurrency: int = 0, rate: float = 0.0,
    event_rate: float = 0.0, jobs: int = 3000, with_driver: bool = True, seed: int = 1,
) -> dict[str, float]:  # fmt: skip
    """One run of the model: closed loop (`concurrency`) or open loop (`rate`/s, evenly
    spaced, as the benchmark's open loop sends). Returns placements/s and p50/p99 in ms.
    `cores` may be fractional (an effective figure): the machine is then ceil(cores) cores
    that together run `cores` cores' worth of work when all are busy, while one stage alone
    runs at full speed (each of n busy stages at min(1, cores/n))."""
    rng = random.Random(seed)
    # Events are keyed by partition: each instance applies its share of them.
    ev_per_s = event_rate + (LIFECYCLE_EVENTS * rate if rate else 0.0)
    util_e = min(0.95, ev_per_s / instances * c.event / 1000.0)
    # What events cost outside the schedulers (their senders, NATS) is work on the same cores.
    left = max(0.1, cores - (ev_per_s * c.bg_event / 1000.0 if with_driver else 0.0))
    slots = max(1, math.ceil(left - 1e-9))
    sched = c.sched / (1.0 - util_e)
    stages: list[tuple[str, float]] = []
    if with_driver:
        stages.append(("driver", c.driver / 2))
    stages += [("nats", c.nats / 2), ("sched", sched), ("nats", c.nats / 2)]
    if with_driver:
        stages.append(("driver", c.driver / 2))
    free_cores = float(slots)
    busy: dict[str, int] = {}
    parallel = {"nats": 1_000_000, "driver": 1}
    waiting: dict[str, list[tuple[float, int, int, int]]] = {}
    events: list[tuple[float, int, str, int, int]] = []  # (t, seq, kind, job, stage)
    start: dict[int, float] = {}
    done: list[float] = []
    seq = 0
    now = 0.0

    def proc_of(job: int, stage: int) -> str:
        name = stages[stage][0]
        return f"sched{job % instances if instances > 1 else 0}" if name == "sched" else name

    def arrive(job: int, stage: int, t: float) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t + HOP_MS, seq, "ready", job, stage))

    # Processes that could start a stage, by their oldest waiting job: (time, seq, process).
    # An entry goes stale when that job starts or the process fills up; it is then skipped.
    # (A scan of every process per event made the projection at 64 instances take minutes.)
    eligible: list[tuple[float, int, str]] = []

    def offer(p: str) -> None:
        q = waiting.get(p)
        if q and busy.get(p, 0) < parallel.get(p, 1):
            heapq.heappush(eligible, (q[0][0], q[0][1], p))

    def dispatch(t: float) -> None:
        """The oldest waiting stage of any process with a free slot runs while cores are
        free (as the scan over every process did)."""
        nonlocal free_cores, seq
        while free_cores >= 1 - 1e-9 and eligible:
            at, s, p = heapq.heappop(eligible)
            q = waiting.get(p)
            if not q or q[0][:2] != (at, s) or busy.get(p, 0) >= parallel.get(p, 1):
                continue
            _, _, job, stage = heapq.heappop(q)
            busy[p] = busy.get(p, 0) + 1
            free_cores -= 1
            running = slots - free_cores  # this stage included
            speed = min(1.0, left / running)
            seq += 1
            heapq.heappush(events, (t + stages[stage][1] / speed, seq, "end", job, stage))
            offer(p)

    next_job = 0

    def new_job(t: float) -> None:
        nonlocal next_job
        j = next_job
        next_job += 1
        start[j] = t
        arrive(j, 0, t)

    if concurrency:
        for _ in range(min(concurrency, jobs)):
            new_job(0.0)
    else:
        t = rng.uniform(0.0, 1000.0 / rate)
        for _ in range(jobs):
            t += 1000.0 / rate
            seq += 1
            heapq.heappush(events, (t, seq, "new", -1, -1))
    while events:
        now, _, kind, job, stage = heapq.heappop(events)
        if kind == "new":
            new_job(now)
        elif kind == "ready":
            seq += 1
            p = proc_of(job, stage)
            q = waiting.setdefault(p, [])
            heapq.heappush(q, (now, seq, job, stage))
            if len(q) == 1:  # a new oldest job (later arrivals queue behind it)
                offer(p)
        else:
            p = proc_of(job, stage)
            busy[p] -= 1
            free_cores += 1
            offer(p)
            if stage + 1 < len(stages):
                arrive(job, stage + 1, now)
            else:
                done.append(now + HOP_MS - start[job])
                if concurrency and next_job < jobs:
                    new_job(now + HOP_MS)
        dispatch(now)
    done.sort()
    return {
        "placements_per_s": round(len(done) / (now / 1000.0), 1) if now else 0.0,
        "p50_ms": round(done[len(done) // 2], 2),
        "p99_ms": round(done[min(len(done) - 1, int(0.99 * len(done)))], 2),
    }


def max_sustained(c: Costs, *, instances: int, cores: float, event_rate: float,
                  with_driver: bool, hi: float = 1e6) -> float:  # fmt: skip
    """The highest open-loop rate whose modelled p99 stays under the target (bisection)."""
    lo = 0.0
    # capacity bound first: no queue is stable above it
    per = c.sched / 1000.0
    hi = min(hi, instances / per if per else hi)
    for _ in range(14):
        mid = (lo + hi) / 2
        if mid <= 0:
            break
        jobs = int(min(4000, max(500, mid * 0.5)))
        r = simulate(c, instances=instances, cores=cores, rate=mid, event_rate=event_rate,
                     jobs=jobs, with_driver=with_driver)  # fmt: skip
        ok = r["p99_ms"] <= P99_TARGET_MS and r["placements_per_s"] >= 0.9 * mid
        lo, hi = (mid, hi) if ok else (lo, mid)
    return round(lo, 1)


def err(pred: float, meas: float) -> float | None:
    return round(100.0 * (pred - meas) / meas, 1) if meas else None


def run_model(out: dict[str, Any]) -> dict[str, Any]:
    cal = calibrate(out)
    cores = cores_effective(out, cal)
    cfg = out["config"]
    conc = cfg["concurrency"]
    points: list[dict[str, Any]] = []

    def point(kind: str, mode: str, nodes: int, instances: int, measured: float,
              predicted: float, fitted: bool, **extra: Any) -> None:  # fmt: skip
        points.append({"kind": kind, "mode": mode, "nodes": nodes, "instances": instances,
                       "measured": measured, "predicted": predicted,
                       "error_pct": err(predicted, measured), "fitted": fitted,
                       "projected": False, "predicted_projected": True, **extra})  # fmt: skip

    n0 = cfg["nodes"]
    for mode, c in cal.items():
        row = out[mode]
        k = row.get("schedulers", 1)
        sim = simulate(costs(c, mode, n0, k), instances=k, cores=cores, concurrency=conc)
        point("closed_loop_placements_per_s", mode, n0, k, row["placements_per_s"],
              sim["placements_per_s"], fitted=True)  # fmt: skip
    # not fitted: 1 and 2 instances (the costs came from the main run's instances)
    for k, row in (out.get("scaling") or {}).items():
        if "partitioned" in cal and k.isdigit() and int(k) != cal["partitioned"]["instances"]:
            sim = simulate(costs(cal["partitioned"], "partitioned", n0, int(k)), instances=int(k),
                           cores=cores, concurrency=conc)  # fmt: skip
            point("closed_loop_placements_per_s", "partitioned", n0, int(k),
                  row["placements_per_s"], sim["placements_per_s"], fitted=False)  # fmt: skip
    # not fitted: other cluster sizes
    for n, rows in (out.get("validation_runs") or {}).items():
        for mode, row in rows.items():
            if mode in cal:
                k = row.get("schedulers", 1)
                sim = simulate(costs(cal[mode], mode, int(n), k), instances=k, cores=cores,
                               concurrency=conc)  # fmt: skip
                point("closed_loop_placements_per_s", mode, int(n), k, row["placements_per_s"],
                      sim["placements_per_s"], fitted=False)  # fmt: skip
    # not fitted: churn (the searched maximum at the calibration rate and at another one)
    churn = out.get("churn") or {}
    for mode, c in cal.items():
        ch = churn.get(mode) or {}
        k = ch.get("instances", 1)
        for res in [ch, *(v for x, v in ch.items() if x.startswith("at_churn_"))]:
            if not res or not res.get("max_sustained_per_s"):
                continue
            pred = max_sustained(costs(c, mode, n0, k), instances=k, cores=cores,
                                 event_rate=res["churn_rate_per_s"], with_driver=True)  # fmt: skip
            point("churn_max_sustained_per_s", mode, n0, k, res["max_sustained_per_s"], pred,
                  fitted=False, churn_rate_per_s=res["churn_rate_per_s"])  # fmt: skip
    unfitted = [p for p in points if not p["fitted"] and p["error_pct"] is not None]
    model: dict[str, Any] = {
        "calibration": {"nodes": n0, "costs_ms": cal, "cores_effective": cores,
                        "hop_ms": HOP_MS},
        "points": points,
        "validated_within_20pct": all(abs(p["error_pct"]) <= 20 for p in unfitted)
        if unfitted else None,
        "max_abs_error_pct_unfitted": max((abs(p["error_pct"]) for p in unfitted), default=None),
    }
    model["projection"] = project(cal)
    model["goal_50k"] = goal_50k(model["projection"])
    return model


def best_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Per cluster size, the row of `mode` that sustains most (for partitioned: the best
    instance count, as the coordinator adds instances while they pay)."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["mode"] == mode and (r["nodes"] not in best or r["max_sustained_per_s"]
                                  > best[r["nodes"]]["max_sustained_per_s"]):
            best[r["nodes"]] = r
    return [best[n] for n in sorted(best)]


def project(cal: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A core per process, no driver or sim, node status every 10 s per node (a kubelet's
    default NodeStatus cadence) as the churn; every figure projected."""
    out: dict[str, Any] = {"assumptions": {
        "cores": "one per process", "status_updates_per_node_per_s": 0.1,
        "pod_events_per_placement": LIFECYCLE_EVENTS, "hop_ms": HOP_MS,
        "events_keyed_by_partition": True}, "rows": []}  # fmt: skip
    for mode, c in cal.items():
        for nodes in (5000, 10000, 20000, 50000, 100000):
            ks = [1, 2, 4, 8, 16, 32, 64] if mode == "partitioned" else [1]
            for k in ks:
                cc = costs(c, mode, nodes, k)
                ev = 0.1 * nodes
                ms = max_sustained(cc, instances=k, cores=float(k + 2), event_rate=ev,
                                   with_driver=False)  # fmt: skip
                out["rows"].append({"mode": mode, "nodes": nodes, "instances": k,
                                    "max_sustained_per_s": ms, "status_updates_per_s": ev,
                                    "projected": True})  # fmt: skip
    return out


def goal_50k(proj: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in proj["rows"] if r["nodes"] == 50000]
    p = best_rows(rows, "partitioned")
    c = [r for r in rows if r["mode"] == "central-indexed"]
    if not p or not c or not c[0]["max_sustained_per_s"]:
        return {}
    best = max(p, key=lambda r: r["max_sustained_per_s"])
    return {"ratio": round(best["max_sustained_per_s"] / c[0]["max_sustained_per_s"], 2),
            "partitioned_per_s": best["max_sustained_per_s"], "instances": best["instances"],
            "central_indexed_per_s": c[0]["max_sustained_per_s"], "projected": True,
            "basis": "projected by the discrete-event model (see model.points for its error)"}


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = out.get("model") or {}
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.8))
    pts = model.get("points", [])
    for fitted, marker in ((True, "o"), (False, "s")):
        xs = [p for p in pts if p["fitted"] == fitted]
        a.scatter([p["measured"] for p in xs], [p["predicted"] for p in xs], marker=marker,
                  label="calibration" if fitted else "validation (not fitted)")  # fmt: skip
        for p in xs:
            a.annotate(f"{p['mode'][:4]} {p['nodes'] // 1000}k x{p['instances']}"
                       + (" churn" if p["kind"].startswith("churn") else ""),
                       (p["measured"], p["predicted"]), fontsize=6)  # fmt: skip
    top = max([p["measured"] for p in pts] + [p["predicted"] for p in pts] + [1])
    a.plot([0, top], [0, top], "k--", lw=0.8)
    a.set_xlabel("measured placements/s")
    a.set_ylabel("predicted placements/s")
    a.set_title("model: measured vs predicted")
    a.legend(fontsize=7)
    churn = out.get("churn") or {}
    for mode in ("partitioned", "central-indexed", "kube-scheduler", "central", "sampling"):
        curve = (churn.get(mode) or {}).get("curve") or []
        if curve:
            b.plot([r["rate_per_s"] for r in curve], [r["p99_ms"] for r in curve], "o-",
                   label=mode)  # fmt: skip
    b.axhline(P99_TARGET_MS, color="k", ls="--", lw=0.8)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("offered placements/s (with churn)")
    b.set_ylabel("p99 ms (measured)")
    b.set_title(f"churn: {churn.get('churn_rate_per_s', 0):g} status updates/s")
    b.legend(fontsize=7)
    rows = (model.get("projection") or {}).get("rows", [])
    for mode in ("partitioned", "central-indexed", "kube-scheduler", "central"):
        rs = best_rows(rows, mode)
        if rs:
            c.plot([r["nodes"] for r in rs], [max(1.0, r["max_sustained_per_s"]) for r in rs],
                   "o--", label=f"{mode} (projected)")  # fmt: skip
    c.set_xscale("log")
    c.set_yscale("log")
    c.set_xlabel("nodes")
    c.set_ylabel("max placements/s, p99 <= 50 ms")
    c.set_title("projection (a core per process)")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
