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
import collections
import contextlib
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from controlplane import subjects
from controlplane.bus import Bus, RemoteError
from controlplane.config import CoordinatorConfig
from controlplane.coordinator import Coordinator
from controlplane.procs import ManagedProcess
from controlplane.schemas import (
    Heartbeat,
    Message,
    NodeInfo,
    Placement,
    PlaceRequest,
    Resources,
    ServiceSpec,
    Unschedulable,
)
from controlplane.servers import start_nats, start_redis
from controlplane.store import Store
from partitions.backends.sim import SimCluster

log = logging.getLogger("bench_schedule")

REPO = Path(__file__).resolve().parent.parent
MODES = ("partitioned", "central", "sampling")
SUBJECT = {
    "partitioned": subjects.PLACE,
    "central": subjects.PLACE_CENTRAL,
    "sampling": subjects.PLACE_SAMPLING,
}
READY_LINE = "fnplane-schedule ready"
GOALS = {
    "throughput_ratio": 5.0,
    "p99_ratio": 0.2,
    "probes_per_placement": 0.2,
    "scaling_1_to_2": 1.7,
}


@dataclass(frozen=True)
class BenchOptions:
    nodes: int = 5000
    placements: int = 10000
    fill: float = 0.8
    partitions: int = 0  # 0: one partition per ~1250 nodes, at least 2
    concurrency: int = 64
    start_delay_s: float = 0.05
    services: int = 50
    seed: int = 7
    modes: tuple[str, ...] = MODES
    scaling: bool = True  # also run partitioned with 1 and 2 instances
    settle_s: float = 1.5  # after partitions are owned: adoption + a summary broadcast
    # This benchmark measures placement, not failure detection. A saturated instance runs
    # its heartbeat behind every ready placement task on its loop, so beats come late;
    # with the coordinator's 1 s default, busy instances are declared dead and partitions
    # move mid-run (`map_changes_during_run` shows whether it still happened).
    heartbeat_timeout_s: float = 3.0
    rate: float = 40.0  # the open-loop latency phase: placements/s offered to every mode
    rate_s: float = 10.0
    request_timeout_s: float = 60.0
    out: Path = REPO / "loadtests" / "out"
    plot: bool = True

    @property
    def p(self) -> int:
        return self.partitions or max(2, min(16, round(self.nodes / 1250)))


# ---- the workload: same nodes, same services, same request sequence for every mode -------


def make_nodes(n: int, services: int, seed: int) -> list[NodeInfo]:
    """A mixed fleet: mostly 16-core nodes, some 8/32-core, 10% 4-GPU nodes; each caches
    the weights of two random models."""
    rng = random.Random(seed)
    kinds = [(8, 32768, 0, 0.2), (16, 65536, 0, 0.5), (32, 131072, 0, 0.2),
             (32, 262144, 4, 0.1)]  # fmt: skip
    weights = [k[3] for k in kinds]
    out = []
    for i in range(n):
        cpu, mem, gpu, _ = rng.choices(kinds, weights)[0]
        models = sorted({f"model-{rng.randrange(services)}" for _ in range(2)})
        out.append(NodeInfo(f"sim-{i:05d}", Resources(cpu, mem, gpu), models=models, backend="sim"))
    return out


def make_services(k: int, seed: int) -> list[ServiceSpec]:
    rng = random.Random(seed + 1)
    shapes = [(Resources(0.5, 1024), 0.6), (Resources(1.0, 4096), 0.3),
              (Resources(2.0, 8192), 0.07), (Resources(4.0, 16384, 1), 0.03)]  # fmt: skip
    return [
        ServiceSpec(
            f"svc-{i}",
            ["sim"],
            resources=rng.choices([s for s, _ in shapes], [w for _, w in shapes])[0],
            model=f"model-{i}",
        )
        for i in range(k)
    ]


def make_requests(services: list[ServiceSpec], n: int, seed: int, tag: str) -> list[PlaceRequest]:
    rng = random.Random(seed + 2)
    return [PlaceRequest(f"{tag}-{i}", rng.choice(services), 0.0) for i in range(n)]


# ---- one mode -------------------------------------------------------------------------


@dataclass
class Drive:
    latencies: list[float] = field(default_factory=list)  # seconds, in request order
    done_at: list[float] = field(default_factory=list)  # seconds since the drive started
    replies: list[Message | Exception] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    wall_s: float = 0.0


async def drive(
    bus: Bus, subject: str, requests: list[PlaceRequest], concurrency: int, timeout: float
) -> Drive:
    """Closed loop: `concurrency` workers, each sends its next request once answered."""
    n = len(requests)
    res = Drive([0.0] * n, [0.0] * n, [RuntimeError("not sent")] * n, [r.pod for r in requests])
    todo = iter(range(n))
    start = time.perf_counter()

    async def worker() -> None:
        for i in todo:
            req = msgspec.structs.replace(requests[i], requested_at=time.time())
            t0 = time.perf_counter()
            try:
                res.replies[i] = await bus.request(subject, req, timeout=timeout)
            except RemoteError as exc:
                res.replies[i] = exc
            t1 = time.perf_counter()
            res.latencies[i], res.done_at[i] = t1 - t0, t1 - start

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    res.wall_s = time.perf_counter() - start
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


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


async def spawn(kind: str, nats_url: str, ident: str, log_dir: Path) -> ManagedProcess:
    argv = [
        sys.executable,
        "-m",
        "functions.schedule",
        "--nats",
        nats_url,
        "--kind",
        kind,
        "--id",
        ident,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    return await ManagedProcess.start(argv, name=ident, log_dir=log_dir, env=env, cwd=REPO)


async def wait_line(proc: ManagedProcess, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            ok = await proc.wait_for_line(READY_LINE)
    except TimeoutError:
        ok = False
    if not ok:
        raise RuntimeError(f"{proc.name} not ready within {timeout:g}s:\n{proc.tail(30)}")


class Beats:
    """The latest heartbeat of each `schedule` instance, as the coordinator hears them."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, Heartbeat]] = {}

    async def on_beat(self, msg: Message, _raw: Any) -> None:
        if isinstance(msg, Heartbeat):
            self.last[msg.instance] = (time.monotonic(), msg)

    def live(self, within_s: float = 1.5) -> int:
        now = time.monotonic()
        return sum(1 for seen, _ in self.last.values() if now - seen <= within_s)


async def wait_beating(beats: Beats, ids: list[str], timeout: float) -> None:
    """Until every instance has sent a heartbeat, so the coordinator knows them all."""
    deadline = time.monotonic() + timeout
    while not set(ids) <= set(beats.last):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no heartbeat from {sorted(set(ids) - set(beats.last))}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the coordinator hears the same beats; let it repartition


async def wait_partitioned(
    coord: Coordinator, beats: Beats, ids: list[str], nodes: int, timeout: float
) -> None:
    """Until every instance owns one partition, all nodes are covered, and each instance
    reports (in its heartbeat) the partition and epoch of the current map."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = coord.pmap.partitions
        owned = {p.owner: p for p in parts if p.owner}
        if (
            set(owned) == set(ids)
            and sum(len(p.nodes) for p in parts) == nodes
            and all(
                i in beats.last
                and (beats.last[i][1].partition, beats.last[i][1].epoch)
                == (owned[i].id, owned[i].epoch)
                for i in ids
            )
        ):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"partitions not settled within {timeout:g}s: {coord.pmap.partitions}")


@contextlib.asynccontextmanager
async def world(
    opts: BenchOptions,
    nats_url: str,
    redis_url: str,
    nodes: list[NodeInfo],
    *,
    runtime: Any = None,
    config: CoordinatorConfig | None = None,
    start_sim: bool = True,
) -> AsyncIterator[tuple[Coordinator, SimCluster, Bus, Beats]]:
    """A fresh control plane state per run: empty Redis, new coordinator, new SimCluster
    (started here unless the caller starts it once its schedulers are up)."""
    store = Store.from_url(redis_url)
    await store.r.flushdb()
    config = config or CoordinatorConfig(heartbeat_timeout_s=opts.heartbeat_timeout_s)
    coord = (
        Coordinator(nats_url, store, config)
        if runtime is None
        else Coordinator(nats_url, store, config, runtime=runtime)
    )
    sim = SimCluster(nats_url, nodes, start_delay_s=opts.start_delay_s, prefill=opts.fill)
    bus = await Bus.connect(nats_url, "bench-driver")
    beats = Beats()
    await bus.subscribe(f"{subjects.HEARTBEAT}.schedule", beats.on_beat)
    try:
        await coord.start()
        if start_sim:
            await sim.start()
        yield coord, sim, bus, beats
    finally:
        await bus.close()
        await sim.stop()
        await coord.stop()
        await store.close()


async def open_loop(
    bus: Bus,
    subject: str,
    plan: list[tuple[float, PlaceRequest]],
    timeout: float,
    failures: collections.Counter[str] | None = None,
) -> list[tuple[float, float, bool]]:
    """Send each request at its planned time, whether or not earlier ones were answered
    (a burst does not wait), and time it from the *planned* send: (at, latency, placed).
    Why the others were not placed is counted in `failures` (reason, cut before details)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    out: list[tuple[float, float, bool]] = []

    async def one(at: float, req: PlaceRequest) -> None:
        try:
            reply = await bus.request(
                subject, msgspec.structs.replace(req, requested_at=time.time()), timeout=timeout
            )
            why = reply.reason if isinstance(reply, Unschedulable) else ""
        except RemoteError as exc:
            reply, why = None, f"error {exc.code}: {exc.message}"
        out.append((at, loop.time() - start - at, isinstance(reply, Placement)))
        if why and failures is not None:
            failures[re.sub(r"[-\w.]*\d[-\w.]*", "#", why)[:90]] += 1

    tasks = []
    for at, req in plan:
        delay = start + at - loop.time()
        if delay > 0.001:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at, req)))
    await asyncio.gather(*tasks)
    return sorted(out)


async def at_rate(
    mode: str, opts: BenchOptions, bus: Bus, requests: list[PlaceRequest]
) -> dict[str, Any]:
    """Latency at the same offered load for every mode (open loop, below every mode's
    capacity), beside the closed loop's latency at saturation, where p99 is mostly queueing."""
    n = int(opts.rate * opts.rate_s)
    reqs = [msgspec.structs.replace(r, pod=f"{r.pod}-rate") for r in requests[:n]]
    sent = await open_loop(
        bus, SUBJECT[mode], [(i / opts.rate, r) for i, r in enumerate(reqs)], opts.request_timeout_s
    )
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
    async with world(opts, nats_url, redis_url, nodes, start_sim=False) as (
        coord,
        sim,
        bus,
        beats,
    ):
        ids = [f"{mode}-{instances}-{i}" for i in range(instances if mode == "partitioned" else 1)]
        procs = [await spawn(mode, nats_url, i, log_dir) for i in ids]
        try:
            if mode == "partitioned":
                await asyncio.gather(*(wait_line(p, 60.0) for p in procs))
                await wait_beating(beats, ids, 60.0)
            # Nodes register once every scheduler is up, so each instance adopts its share
            # once, in a calm moment: the benchmark measures placement, not adoption.
            await sim.start()
            await asyncio.gather(*(wait_line(p, 60.0) for p in procs))
            if mode == "partitioned":
                await wait_partitioned(coord, beats, ids, len(nodes), 60.0)
                await asyncio.sleep(opts.settle_s)
            log.info("%s x%d: driving %d placements", mode, len(ids), len(requests))
            version = coord.pmap.version
            pids = {
                "schedulers": [p.pid for p in procs],
                "driver_and_sim": [os.getpid()],
                "nats_server": [nats_pid] if nats_pid else [],
            }
            cpu0 = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
            d = await drive(bus, SUBJECT[mode], requests, opts.concurrency, opts.request_timeout_s)
            cpu1 = {k: sum(cpu_s(p) for p in v) for k, v in pids.items()}
            await asyncio.sleep(opts.start_delay_s + 0.2)  # the last pods become ready
            result = summarize(mode, d, sim, len(ids))
            # Non-zero means an instance looked dead to the coordinator mid-run (missed
            # heartbeats under CPU load) and partitions moved: worth knowing when reading p99.
            result["map_changes_during_run"] = coord.pmap.version - version
            # CPU time per placement, by process group: unlike placements/s, this does not
            # depend on what else the machine was running.
            result["cpu_ms_per_placement"] = {
                k: round((cpu1[k] - cpu0[k]) * 1000 / len(requests), 3) for k in pids if pids[k]
            }
            if opts.rate > 0 and opts.rate_s > 0:
                result["at_rate"] = await at_rate(mode, opts, bus, requests)
                result["overcommitted_nodes"] = len(sim.overcommitted_nodes())
        finally:
            await asyncio.gather(*(p.stop(timeout=5.0) for p in procs), return_exceptions=True)
    log.info("%s x%d: %s", mode, len(ids), json.dumps(result))
    return result, d


# ---- the whole benchmark -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def servers(
    nats_url: str | None, redis_url: str | None, tmp: Path
) -> AsyncIterator[tuple[str, str, int | None]]:
    nats = redis = None
    try:
        if nats_url is None:
            nats = await start_nats(tmp / "nats", jetstream=False)
            nats_url = nats.url
        if redis_url is None:
            redis = await start_redis(tmp / "redis")
            redis_url = redis.url
        yield nats_url, redis_url, nats.process.pid if nats is not None else None
    finally:
        for server in (redis, nats):
            if server is not None:
                await server.stop()


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


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
                for k in (1, 2):
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
                out["scaling"] = scaling
    out["config"]["loadavg_after"] = load()
    out["ratios"] = ratios(out)
    out["goals"] = goals(out)
    return out


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process so far (Linux /proc), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> list[float]:
    """The machine's load average: other work on these 2 cores skews every number here."""
    return [round(x, 2) for x in os.getloadavg()]


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


# ---- --elastic: a step burst, and the schedule-instance count over time -------------------


def elastic_runtime(nats_url: str, redis_url: str) -> Any:
    """The coordinator's process runtime: `schedule` instances as OS processes, scaled with
    their load, which is what --elastic shows."""
    from controlplane.runtime import ProcessRuntime

    return ProcessRuntime(nats_url, redis_url, kinds=["schedule"])


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
                            bus, subjects.PLACE, plan, opts.request_timeout_s, failures
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
    )
    return opts, a


async def amain(argv: list[str] | None = None) -> dict[str, Any]:
    opts, a = options(argv)
    if a.elastic:
        return await run_elastic(opts, a)
    out = await run_benchmark(opts)
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
