"""The scheduler benchmark of issue 3: partitioned `schedule` vs a central scheduler vs
Sparrow-like sampling, in one run, on one simulated cluster, over one real NATS server.

    python -m loadtests.bench_schedule --nodes 5000 --json [--placements N] [--fill 0.8]
        [--partitions P] [--concurrency C] [--quick] [--elastic] [--out DIR]

Per mode: a fresh world (real coordinator with Redis, the scheduler(s) as their own OS
processes, a `SimCluster` pre-filled to `--fill` in this process), then `--placements`
PlaceRequests from a closed-loop driver with `--concurrency` in flight (throughput, and latency
at saturation), then `--rate` placements/s open-loop (latency at the same load for every mode).
Partitioned runs again with 1 and 2 instances for the scaling ratio. Each run also reports CPU
time per placement by process group, which other work on the machine does not skew.

`--elastic`: one world whose coordinator scales `schedule` instances through its instance
runtime; a step burst (base → burst → base), p99 per second, instances over time (from
heartbeats), and the time for p99 to come back under `--p99-target-ms`.

Prints ONE JSON object and writes it and a PNG next to each other under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import msgspec

from kernel.bus import Bus
from kernel.messages import NodeInfo, PlaceRequest, ServiceSpec, encode
from loadtests import bench_model, nats_floor
from loadtests import bench_scenarios as sc
from loadtests.bench_elastic import run_elastic
from loadtests.bench_harness import (
    ENDPOINT,
    MODES,
    REFERENCE,
    REPO,
    BenchOptions,
    Drive,
    drive,
    load,
    make_nodes,
    make_requests,
    make_services,
    mode_world,
    open_loop,
    pct,
    servers,
)
from loadtests.bench_report import goals, ratios, summarize, write

log = logging.getLogger("bench_schedule")

# ---- one mode -------------------------------------------------------------------------


async def at_rate(
    mode: str, opts: BenchOptions, bus: Bus, requests: list[PlaceRequest]
) -> dict[str, Any]:
    """Latency at the same offered load for every mode (open loop, below every mode's
    capacity), beside the closed loop's latency at saturation, where p99 is mostly queueing."""
    n = int(opts.rate * opts.rate_s)
    reqs = [msgspec.structs.replace(r, pod=f"{r.pod}-rate") for r in requests[:n]]
    plan = [(i / opts.rate, r) for i, r in enumerate(reqs)]
    sent = await open_loop(bus, ENDPOINT[mode], plan, opts.request_timeout_s)
    lat = [x for _, x, _ in sent]
    return {
        "rate_per_s": opts.rate,
        "placements": len(sent),
        "placed": sum(ok for *_, ok in sent),
        "p50_ms": round(pct(lat, 0.5) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
    }


async def run_mode(
    mode: str,
    opts: BenchOptions,
    nats_url: str,
    redis_url: str,
    nodes: list[NodeInfo],
    requests: list[PlaceRequest],
    log_dir: Path,
    *,
    instances: int = 1,
    nats_pid: int | None = None,
) -> tuple[dict[str, Any], Drive]:
    async with mode_world(mode, opts, nats_url, redis_url, nodes, log_dir,
                          instances=instances, nats_pid=nats_pid) as w:  # fmt: skip
        n = len(w.procs)
        log.info("%s x%d: driving %d placements", mode, n, len(requests))
        version = w.coord.pmap.version
        cpu0 = w.cpu()
        d = await drive(w.bus, ENDPOINT[mode], requests, opts.concurrency, opts.request_timeout_s)
        cpu1 = w.cpu()
        await asyncio.sleep(opts.start_delay_s + 0.2)  # the last pods become ready
        result = summarize(mode, d, w.sim, n)
        # Non-zero means an instance looked dead to the coordinator mid-run (missed
        # heartbeats under CPU load) and partitions moved: worth knowing when reading p99.
        result["map_changes_during_run"] = w.coord.pmap.version - version
        # CPU time per placement, by process group: unlike placements/s, this does not
        # depend on what else the machine was running.
        result["cpu_ms_per_placement"] = {
            k: round((cpu1[k] - cpu0[k]) * 1000 / len(requests), 3) for k in cpu1
        }
        result["projected"] = False
        if opts.rate > 0 and opts.rate_s > 0:
            result["at_rate"] = await at_rate(mode, opts, w.bus, requests)
            result["overcommitted_nodes"] = len(w.sim.overcommitted_nodes())
    log.info("%s x%d: %s", mode, n, json.dumps(result))
    return result, d


# ---- the scenarios of issue 13 ----------------------------------------------------------------


async def skewed_all(
    opts: BenchOptions, nurl: str, rurl: str, nodes: list[NodeInfo],
    services: list[ServiceSpec], tmp: Path, npid: int | None,
) -> dict[str, Any]:  # fmt: skip
    layout = sc.skewed_layout(nodes, opts.p)
    pool = sc.skewed_requests(services, 20000, opts.seed)
    cap = sc.skewed_capacity(nodes, pool, layout)
    n = opts.skewed_placements or max(1, min(4000, int(0.95 * cap)))
    reqs = pool[:n]
    out: dict[str, Any] = {
        "placements": n,
        "fill_mean": layout.mean,
        "partitions": len(layout.partitions),
        "hot_partitions": len(layout.hot),
        "hot_fill": sc.SKEW_HOT_FILL,
        "cold_fill": sc.SKEW_COLD_FILL,
    }
    for mode in opts.modes:
        out[mode] = await sc.run_skewed(mode, opts, nurl, rurl, nodes, reqs, layout,
                                        tmp / "logs", nats_pid=npid)  # fmt: skip
    ref = out.get(REFERENCE)
    for mode in opts.modes:
        if ref and mode != REFERENCE:
            out[mode]["unschedulable_over_central_indexed"] = round(
                out[mode]["unschedulable"] / max(1, ref["unschedulable"]), 3
            )
    return out


async def churn_all(
    opts: BenchOptions, nurl: str, rurl: str, nodes: list[NodeInfo],
    services: list[ServiceSpec], tmp: Path, npid: int | None,
) -> dict[str, Any]:  # fmt: skip
    co = sc.ChurnOptions(churn_rate=opts.churn_rate, search=opts.churn_search,
                         step_s=opts.churn_step_s, start_rate=100.0 if opts.churn_search else 50.0,
                         lifetime_s=opts.churn_lifetime_s,
                         event_only_s=2.0 if opts.churn_search else 1.0)  # fmt: skip
    reqs = make_requests(services, 4000, opts.seed, "churn")
    out: dict[str, Any] = {"churn_rate_per_s": co.churn_rate, "lifetime_s": co.lifetime_s,
                           "p99_target_ms": co.p99_target_ms, "max_sustained": {}}  # fmt: skip
    for mode in opts.modes:
        extra = ((opts.churn_validate_rate,) if opts.churn_validate_rate
                 and mode in ("partitioned", REFERENCE) else ())  # fmt: skip
        out[mode] = await sc.run_churn(mode, opts, co, nurl, rurl, nodes, reqs, tmp / "logs",
                                       nats_pid=npid, extra_churn_rates=extra)  # fmt: skip
        out["max_sustained"][mode] = {
            "max_sustained_per_s": out[mode]["max_sustained_per_s"],
            "searched": co.search, "projected": False,
        }  # fmt: skip
    return out


async def validation_runs(
    opts: BenchOptions, nurl: str, rurl: str, services: list[ServiceSpec], tmp: Path,
    npid: int | None,
) -> dict[str, Any]:  # fmt: skip
    """Plain closed-loop runs at other cluster sizes: points the model must predict."""
    out: dict[str, Any] = {}
    for n in opts.validate_nodes:
        nodes = make_nodes(n, opts.services, opts.seed)
        o = replace(opts, nodes=n, partitions=opts.p)
        out[str(n)] = {}
        for mode in ("partitioned", REFERENCE, "kube-scheduler", "central"):
            if mode not in opts.modes:
                continue
            k = 1000 if mode == "central" and n > 5000 else min(opts.placements, 3000)
            reqs = make_requests(services, k, opts.seed, f"v{n}")
            row, _ = await run_mode(mode, replace(o, rate=0), nurl, rurl, nodes, reqs,
                                    tmp / "logs", instances=opts.p, nats_pid=npid)  # fmt: skip
            out[str(n)][mode] = row
    return out


# ---- the whole benchmark -----------------------------------------------------------------


async def run_benchmark(
    opts: BenchOptions, *, nats_url: str | None = None, redis_url: str | None = None
) -> dict[str, Any]:
    nodes = make_nodes(opts.nodes, opts.services, opts.seed)
    services = make_services(opts.services, opts.seed)
    out: dict[str, Any] = {
        "config": {
            **asdict(opts),
            "out": str(opts.out),
            "partitions": opts.p,
            "cpus": os.cpu_count(),
            "loadavg_before": load(),
        }
    }
    drives: dict[str, Drive] = {}
    with tempfile.TemporaryDirectory(prefix="bench-schedule-") as tmpdir:
        tmp = Path(tmpdir)
        async with servers(nats_url, redis_url, tmp) as (nurl, rurl, npid):
            for mode in opts.modes:
                reqs = make_requests(services, opts.placements, opts.seed, mode)
                out[mode], drives[mode] = await run_mode(
                    mode,
                    opts,
                    nurl,
                    rurl,
                    nodes,
                    reqs,
                    tmp / "logs",
                    instances=opts.p,
                    nats_pid=npid,
                )
            if opts.scaling:
                scaling: dict[str, Any] = {}
                # 4 too (when the main run has that many): CPU per placement at 4 vs 1.
                for k in sorted({1, 2, min(4, opts.p)}):
                    if k == opts.p and "partitioned" in out:
                        scaling[str(k)] = out["partitioned"]
                        continue
                    reqs = make_requests(services, opts.placements, opts.seed, f"scale{k}")
                    scaling[str(k)], _ = await run_mode(
                        "partitioned",
                        opts,
                        nurl,
                        rurl,
                        nodes,
                        reqs,
                        tmp / "logs",
                        instances=k,
                        nats_pid=npid,
                    )
                if "4" in scaling:
                    # The same backlog per instance as the single one had (4x in flight):
                    # what is left of the growth in CPU per placement is coordination, not
                    # each process waking up for fewer messages at a time.
                    reqs = make_requests(services, opts.placements, opts.seed, "scale4b")
                    scaling["4_same_backlog"], _ = await run_mode(
                        "partitioned", replace(opts, concurrency=4 * opts.concurrency, rate=0),
                        nurl, rurl, nodes, reqs, tmp / "logs", instances=4, nats_pid=npid,
                    )
                out["scaling"] = scaling
            if opts.skewed:
                out["skewed"] = await skewed_all(opts, nurl, rurl, nodes, services, tmp, npid)
            if opts.churn:
                out["churn"] = await churn_all(opts, nurl, rurl, nodes, services, tmp, npid)
            if opts.validate_nodes:
                out["validation_runs"] = await validation_runs(opts, nurl, rurl, services, tmp,
                                                               npid)  # fmt: skip
            # The floor: raw request-reply through the same server at the same concurrency.
            floor = await nats_floor.measure(
                nurl, tmp / "logs", concurrency=opts.concurrency,
                requests=max(2000, min(20000, opts.placements * 2)),
                payload=encode(make_requests(services, 1, opts.seed, "floor")[0]),
            )  # fmt: skip
            out["nats_floor"] = floor
            out["nats_floor_rps"] = floor["rps"]
            for m in opts.modes:
                rate = out[m]["placements_per_s"]
                out[m]["fraction_of_nats_floor"] = round(rate / floor["rps"], 3)
                out[m]["fraction_of_two_round_trip_ceiling"] = round(
                    rate / floor["two_round_trip_ceiling_per_s"], 3)
    out["config"]["loadavg_after"] = load()
    out["ratios"] = ratios(out)
    if opts.model:
        out["model"] = bench_model.run_model(out)
    out["goals"] = goals(out)
    return out


# ---- the CLI -------------------------------------------------------------------------------


def options(argv: list[str] | None) -> tuple[BenchOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_schedule",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=5000)
    p.add_argument("--placements", type=int, default=None, help="default 10000 (quick: 1000)")
    p.add_argument("--fill", type=float, default=0.8, help="pre-filled fraction of each node")
    p.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="schedule instances (default: one per ~1250 nodes, at least 2)",
    )
    p.add_argument("--concurrency", type=int, default=64, help="placements in flight")
    p.add_argument("--start-delay", type=float, default=0.05, help="simulated pod start (s)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-scaling", action="store_true", help="skip the 1-vs-2 instance runs")
    p.add_argument("--quick", action="store_true", help="a run under a minute")
    p.add_argument("--elastic", action="store_true", help="step burst; instances over time")
    p.add_argument("--base-rate", type=float, default=20.0, help="elastic: placements/s")
    p.add_argument("--burst-rate", type=float, default=1500.0, help="elastic: placements/s")
    p.add_argument("--burst-s", type=float, default=10.0, help="elastic: burst length")
    p.add_argument("--p99-target-ms", type=float, default=100.0, help="elastic")
    p.add_argument(
        "--rate",
        type=float,
        default=40.0,
        help="open-loop latency phase: placements/s offered to every mode (0: off)",
    )
    p.add_argument("--rate-s", type=float, default=None, help="its length (default 10, quick 3)")
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=3.0,
        help="coordinator: silence before an instance is declared dead (its default: 1 s)",
    )
    p.add_argument("--no-skewed", action="store_true", help="skip the 95%%-fill skewed runs")
    p.add_argument("--skewed-placements", type=int, default=0)
    p.add_argument("--no-churn", action="store_true", help="skip the churn scenario")
    p.add_argument("--churn-rate", type=float, default=2000.0, help="status updates/s")
    p.add_argument("--churn-validate-rate", type=float, default=None,
                   help="a second churn rate for the model (default 2x; quick: none)")
    p.add_argument("--validate-nodes", default=None,
                   help="cluster sizes the model is checked on (default 1000,20000; quick: none)")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--reanalyse", type=Path, default=None, metavar="JSON",
                   help="measure nothing: recompute ratios, model and goals from a saved run "
                        "(the JSON says so in `reanalysed_from`)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "out")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    modes = tuple(m for m in a.modes.split(",") if m)
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}")
    placements = a.placements or (1000 if a.quick else 10000)
    opts = BenchOptions(
        nodes=a.nodes,
        placements=placements,
        fill=a.fill,
        partitions=a.partitions,
        concurrency=a.concurrency,
        start_delay_s=a.start_delay,
        seed=a.seed,
        modes=modes,
        scaling=not a.no_scaling,
        out=a.out,
        settle_s=1.2 if a.quick else 1.5,
        heartbeat_timeout_s=a.heartbeat_timeout,
        rate=a.rate,
        rate_s=a.rate_s if a.rate_s is not None else (3.0 if a.quick else 10.0),
        skewed=not a.no_skewed,
        skewed_placements=a.skewed_placements,
        churn=not a.no_churn,
        churn_rate=a.churn_rate,
        churn_search=not a.quick,
        churn_step_s=1.5 if a.quick else 3.0,
        churn_lifetime_s=0.5 if a.quick else 2.0,
        churn_validate_rate=(a.churn_validate_rate if a.churn_validate_rate is not None
                             else (0.0 if a.quick else 2 * a.churn_rate)),
        validate_nodes=tuple(int(x) for x in (a.validate_nodes if a.validate_nodes is not None
                                              else ("" if a.quick else "1000,20000")).split(",")
                             if x),
        model=not a.no_model,
    )
    return opts, a


async def amain(argv: list[str] | None = None) -> dict[str, Any]:
    opts, a = options(argv)
    if a.elastic:
        return await run_elastic(opts, a)
    if a.reanalyse is not None:
        out = json.loads(a.reanalyse.read_text())
        out["reanalysed_from"] = str(a.reanalyse)
        out["ratios"] = ratios(out)
        if opts.model:
            out["model"] = bench_model.run_model(out)
        out["goals"] = goals(out)
    else:
        out = await run_benchmark(opts)
    if opts.plot and "model" in out:
        opts.out.mkdir(parents=True, exist_ok=True)
        out.setdefault("files", {})["model_png"] = str(opts.out / "bench_schedule_model.png")
        bench_model.plot(out, opts.out / "bench_schedule_model.png")
    return write(out, opts, "bench_schedule")


def main(argv: list[str] | None = None) -> int:
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:
        out = asyncio.run(amain(argv))
    else:
        out = uvloop.run(amain(argv))
    print(json.dumps(out, indent=None if "--json" in (argv or sys.argv[1:]) else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
