"""`python -m loadtests.bench_schedule --elastic`: one world whose coordinator scales
`schedule` instances through its instance runtime, a step burst (base → burst → base), p99 per
second, instances over time, and how long p99 takes to come back under target.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kernel import endpoints as ep
from kernel.config import Config, CoordinatorConfig
from kernel.messages import PlaceRequest
from loadtests.bench_harness import (
    BenchOptions,
    load,
    make_nodes,
    make_requests,
    make_services,
    open_loop,
    pct,
    servers,
    spawn,
    world,
)
from loadtests.bench_report import write


def elastic_runtime(nats_url: str, redis_url: str) -> Any:
    """The coordinator's process runtime: `schedule` instances as OS processes, scaled with
    their load, which is what --elastic shows."""
    from controlplane.runtime import ProcessRuntime

    return ProcessRuntime(Config(nats_url=nats_url, redis_url=redis_url), kinds=["schedule"])


def phases(a: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(name, placements/s, seconds): steady, a step up, steady again."""
    base_s, after_s = (3.0, 6.0) if a.quick else (5.0, 15.0)
    burst_s = min(a.burst_s, 5.0) if a.quick else a.burst_s
    return [
        ("base", a.base_rate, base_s),
        ("burst", a.burst_rate, burst_s),
        ("after", a.base_rate, after_s),
    ]


def recovery(
    windows: list[tuple[float, float]], burst_at: float, target_ms: float, *, hold: int = 3
) -> float | None:
    """Seconds from the burst's start until p99 is under target for `hold` windows in a row
    (or until the end of the run, if fewer remain)."""
    after = [(t, p99) for t, p99 in windows if t >= burst_at]
    for i, (t, _) in enumerate(after):
        if all(p99 <= target_ms for _, p99 in after[i : i + hold]):
            return round(max(0.0, t - burst_at), 2)
    return None


async def run_elastic(opts: BenchOptions, a: argparse.Namespace) -> dict[str, Any]:
    nodes = make_nodes(opts.nodes, opts.services, opts.seed)
    services = make_services(opts.services, opts.seed)
    steps = phases(a)
    plan: list[tuple[float, PlaceRequest]] = []
    t = 0.0
    for _, rate, secs in steps:
        count = int(rate * secs)
        plan += [(t + i / rate, None) for i in range(count)]  # type: ignore[misc]
        t += secs
    reqs = make_requests(services, len(plan), opts.seed, "elastic")
    plan = [(at, r) for (at, _), r in zip(plan, reqs, strict=True)]
    samples: list[tuple[float, int]] = []
    failures: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as tmpdir:
        tmp = Path(tmpdir)
        async with servers(None, None, tmp) as (nurl, rurl, _):
            runtime = elastic_runtime(nurl, rurl)
            cfg = (
                CoordinatorConfig(
                    schedule_max=max(opts.p, 2), heartbeat_timeout_s=opts.heartbeat_timeout_s
                )
                if runtime
                else None
            )
            async with world(opts, nurl, rurl, nodes, runtime=runtime, config=cfg) as (
                coord,
                _sim,
                bus,
                beats,
            ):
                procs = []
                if runtime is None:  # fixed instances: the burst is met by what runs
                    procs = [
                        await spawn("partitioned", nurl, f"fixed-{i}", tmp / "logs")
                        for i in range(opts.p)
                    ]
                try:
                    deadline = time.monotonic() + 60
                    while beats.live() < max(1, len(procs)) or not any(
                        p.owner for p in coord.pmap.partitions
                    ):
                        if time.monotonic() > deadline:
                            raise RuntimeError("no schedule instance came up within 60s")
                        await asyncio.sleep(0.1)
                    await asyncio.sleep(opts.settle_s)
                    t0 = time.monotonic()

                    async def sample() -> None:
                        while True:
                            samples.append((round(time.monotonic() - t0, 2), beats.live()))
                            await asyncio.sleep(0.25)

                    sampler = asyncio.create_task(sample())
                    try:
                        sent = await open_loop(
                            bus, ep.PLACE, plan, opts.request_timeout_s, failures
                        )
                    finally:
                        sampler.cancel()
                finally:
                    await asyncio.gather(
                        *(p.stop(timeout=5.0) for p in procs), return_exceptions=True
                    )
    windows = []
    for sec in range(int(t) + 1):
        lat = [lat for at, lat, _ in sent if sec <= at < sec + 1]
        if lat:
            windows.append((float(sec), round(pct(lat, 0.99) * 1000, 1)))
    burst_at = steps[0][2]
    out = {
        "config": {
            **asdict(opts),
            "out": str(opts.out),
            "loadavg": load(),
            "phases": steps,
            "p99_target_ms": a.p99_target_ms,
            "autoscaling": "coordinator + ProcessRuntime"
            if runtime
            else f"none (no instance runtime): {opts.p} fixed instances",
        },
        "placements": len(sent),
        "placed": sum(ok for *_, ok in sent),
        "not_placed": sum(not ok for *_, ok in sent),  # unschedulable or no answer
        "not_placed_why": dict(failures.most_common(5)),
        "p99_ms_per_s": windows,
        "instances_over_time": samples,
        "max_instances": max((n for _, n in samples), default=0),
        "p99_recovery_s": recovery(windows, burst_at, a.p99_target_ms),
    }
    return write(out, opts, "bench_schedule_elastic", plot_elastic)


def plot_elastic(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    w = out["p99_ms_per_s"]
    a.plot([t for t, _ in w], [p for _, p in w], "o-", label="p99 per second")
    a.axhline(out["config"]["p99_target_ms"], color="grey", ls="--", label="target")
    a.set_yscale("log")
    a.set_ylabel("placement p99 (ms)")
    a.legend()
    s = out["instances_over_time"]
    b.step([t for t, _ in s], [n for _, n in s], where="post")
    b.set_ylabel("schedule instances")
    b.set_xlabel("seconds")
    fig.suptitle(f"step burst; p99 back under target after {out['p99_recovery_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
