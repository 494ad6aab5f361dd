"""The scheduler benchmark's harness: the workload, a fresh world per run (Redis, coordinator,
`SimCluster`, `schedule` instances as OS processes) and the drivers that send PlaceRequests.
`bench_schedule.py` and `bench_elastic.py` decide what to run, `bench_report.py` what it meant.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from controlplane.coordinator import Coordinator
from controlplane.instance import CONFIG_ENV, READY_LINE
from controlplane.servers import start_nats, start_redis
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import Config, CoordinatorConfig, dumps
from kernel.endpoints import Endpoint
from kernel.errors import NoResponders, RemoteError
from kernel.messages import (
    Heartbeat,
    NodeInfo,
    Placement,
    PlaceRequest,
    Resources,
    ServiceSpec,
    Unschedulable,
)
from kernel.procs import ManagedProcess
from kernel.store import Store
from partitions.agents.sim import SimCluster

REPO = Path(__file__).resolve().parent.parent
MODES = ("partitioned", "central-indexed", "kube-scheduler", "central", "sampling")
# The ratios that count are against the strongest central design: one process, same index.
REFERENCE = "central-indexed"
NO_RESPONDERS_WAIT_S = 2.0  # as `scale` waits out an empty placement queue group

# What every mode answers a PlaceRequest on: ep.PLACE, ep.PLACE_CENTRAL or ep.PLACE_SAMPLING.
PlaceEndpoint = Endpoint[PlaceRequest, Placement | Unschedulable]


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
    skewed: bool = True  # the 95%-fill skewed scenario, every mode
    skewed_placements: int = 0  # 0: 95% of what the skewed cluster holds (at most 4000)
    churn: bool = True  # the churn scenario, every mode
    churn_rate: float = 2000.0  # node status updates per second
    churn_search: bool = True  # search the highest rate with p99 <= 50 ms (--quick: no)
    churn_step_s: float = 3.0
    churn_lifetime_s: float = 2.0  # a pod's life from ready to stop, in the churn scenario
    churn_validate_rate: float = 0.0  # a second churn rate (model validation); 0: none
    validate_nodes: tuple[int, ...] = ()  # cluster sizes the model must predict (not fitted)
    model: bool = True  # calibrate, validate and project the discrete-event model
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
        cap = Resources(cpu=cpu, memory_mb=mem, gpu=gpu)
        out.append(NodeInfo(name=f"sim-{i:05d}", capacity=cap, models=models, backend="sim"))
    return out


def make_services(k: int, seed: int) -> list[ServiceSpec]:
    rng = random.Random(seed + 1)
    shapes = [(Resources(cpu=0.5, memory_mb=1024), 0.6),
              (Resources(cpu=1.0, memory_mb=4096), 0.3),
              (Resources(cpu=2.0, memory_mb=8192), 0.07),
              (Resources(cpu=4.0, memory_mb=16384, gpu=1), 0.03)]  # fmt: skip
    return [
        ServiceSpec(
            name=f"svc-{i}",
            command=["sim"],
            resources=rng.choices([s for s, _ in shapes], [w for _, w in shapes])[0],
            model=f"model-{i}",
        )
        for i in range(k)
    ]


def make_requests(services: list[ServiceSpec], n: int, seed: int, tag: str) -> list[PlaceRequest]:
    rng = random.Random(seed + 2)
    return [
        PlaceRequest(pod=f"{tag}-{i}", spec=rng.choice(services), requested_at=0.0)
        for i in range(n)
    ]


# ---- the drivers ------------------------------------------------------------------------


@dataclass
class Drive:
    latencies: list[float] = field(default_factory=list)  # seconds, in request order
    done_at: list[float] = field(default_factory=list)  # seconds since the drive started
    replies: list[Placement | Unschedulable | Exception] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    wall_s: float = 0.0


async def drive(
    bus: Bus, endpoint: PlaceEndpoint, requests: list[PlaceRequest], concurrency: int,
    timeout: float,
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
                res.replies[i] = await place(bus, endpoint, req, timeout)
            except RemoteError as exc:
                res.replies[i] = exc
            t1 = time.perf_counter()
            res.latencies[i], res.done_at[i] = t1 - t0, t1 - start

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    res.wall_s = time.perf_counter() - start
    return res


async def place(
    bus: Bus, endpoint: PlaceEndpoint, req: PlaceRequest, timeout: float
) -> Placement | Unschedulable:
    """One placement, as `scale` asks for it: nobody in the queue group for a moment (an
    instance stepping aside as another rejoins, a partition changing hands) is waited out for
    up to 2 s, not counted as an error."""
    deadline = time.monotonic() + NO_RESPONDERS_WAIT_S
    while True:
        try:
            return await bus.call(endpoint, req, timeout=timeout)
        except NoResponders:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def open_loop(
    bus: Bus,
    endpoint: PlaceEndpoint,
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
            reply = await place(
                bus, endpoint, msgspec.structs.replace(req, requested_at=time.time()), timeout
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


# ---- the world ----------------------------------------------------------------------------


# A scheduler of each mode as the instance entry point runs it (controlplane/instance.py).
INSTANCE_KIND = {"partitioned": "schedule", "central": "central", "sampling": "sampling",
                 "central-indexed": "central-indexed", "kube-scheduler": "kube-scheduler"}


async def spawn(kind: str, nats_url: str, ident: str, log_dir: Path) -> ManagedProcess:
    argv = [sys.executable, "-m", "controlplane.instance", INSTANCE_KIND[kind], "--id", ident]
    env = {
        **os.environ,
        CONFIG_ENV: dumps(Config(nats_url=nats_url)),
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

    async def on_beat(self, msg: Heartbeat, _raw: Any) -> None:
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
    prefill_of: Callable[[NodeInfo], float] | None = None,
    lifetime_s: float = 0.0,
) -> AsyncIterator[tuple[Coordinator, SimCluster, Bus, Beats]]:
    """A fresh control plane state per run: empty Redis, new coordinator, new SimCluster
    (started here unless the caller starts it once its schedulers are up)."""
    store = Store.from_url(redis_url)
    await store.r.flushdb()
    config = config or CoordinatorConfig(heartbeat_timeout_s=opts.heartbeat_timeout_s)
    coord = Coordinator(await Bus.connect(nats_url, "coordinator-bench"), store, config,
                        runtime=runtime)
    # The baselines own no partition: this sim takes their unpartitioned starts.
    sim = SimCluster(await Bus.connect(nats_url, "sim"), nodes, start_delay_s=opts.start_delay_s,
                     prefill=opts.fill, unpartitioned=True, prefill_of=prefill_of,
                     lifetime_s=lifetime_s)
    bus = await Bus.connect(nats_url, "bench-driver")
    beats = Beats()
    await bus.serve(ep.HEARTBEAT, beats.on_beat, kind="schedule")
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


# The endpoint each mode answers on. The central variants run one at a time, each in its own
# world: one subject serves them all.
ENDPOINT: dict[str, PlaceEndpoint] = {
    "partitioned": ep.PLACE,
    "central": ep.PLACE_CENTRAL,
    "central-indexed": ep.PLACE_CENTRAL,
    "kube-scheduler": ep.PLACE_CENTRAL,
    "sampling": ep.PLACE_SAMPLING,
}


@dataclass
class ModeWorld:
    coord: Coordinator
    sim: SimCluster
    bus: Bus
    beats: Beats
    procs: list[ManagedProcess]
    pids: dict[str, list[int]]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per process group."""
        return {k: sum(cpu_s(p) for p in v) for k, v in self.pids.items() if v}


@contextlib.asynccontextmanager
async def mode_world(
    mode: str, opts: BenchOptions, nats_url: str, redis_url: str, nodes: list[NodeInfo],
    log_dir: Path, *, instances: int = 1, nats_pid: int | None = None, **world_kw: Any,
) -> AsyncIterator[ModeWorld]:  # fmt: skip
    """A fresh world with `mode`'s scheduler(s) running as their own processes, every node
    registered and (partitioned) every partition owned and adopted."""
    async with world(opts, nats_url, redis_url, nodes, start_sim=False, **world_kw) as (
        coord, sim, bus, beats,
    ):  # fmt: skip
        n = instances if mode == "partitioned" else 1
        ids = [f"{mode}-{instances}-{i}" for i in range(n)]
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
            pids = {
                "schedulers": [p.pid for p in procs],
                "driver_and_sim": [os.getpid()],
                "nats_server": [nats_pid] if nats_pid else [],
            }
            yield ModeWorld(coord, sim, bus, beats, procs, pids)
        finally:
            await asyncio.gather(*(p.stop(timeout=5.0) for p in procs), return_exceptions=True)


# ---- the machine -------------------------------------------------------------------------


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
