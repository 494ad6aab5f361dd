"""The two scenarios of issue 13 beside the plain runs of `bench_schedule.py`:

- `skewed`: a cluster at ~95% fill, unevenly *along partition membership* (the nodes of half
  the partitions nearly full, the others with room), and demand concentrated on a few models,
  sized to what the cluster can hold. Placements are shared evenly among `schedule`
  instances, so those owning a full partition must probe another. Probes, probe-cache hits,
  the latency of probed placements apart, and unschedulable pods, per mode; every mode gets
  the same node fills and the same requests.
- `churn`: pods that live `lifetime_s` (each placement is then four pod events: starting,
  ready, terminating, stopped) and node status updates from their own process at
  `churn_rate`/s; per mode, the highest open-loop placement rate whose p99 stays under
  `p99_target_ms` (a doubling search, then bisection; the curve is every step), and the CPU
  per placement and per applied event by process group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from kernel.messages import NodeInfo, Placement, PlaceRequest, ServiceSpec, Unschedulable
from kernel.procs import ManagedProcess
from loadtests.bench_harness import (
    ENDPOINT,
    REPO,
    BenchOptions,
    ModeWorld,
    drive,
    mode_world,
    open_loop,
    pct,
)
from loadtests.bench_report import summarize
from partitions.nodes import NodeState
from partitions.partitioner import rebalance
from partitions.view import PartitionView

log = logging.getLogger("bench_scenarios")

# The nodes of the hot partitions are nearly full, the others keep room: mean 0.95 when half
# the partitions (by capacity, which the partitioner balances) are hot.
SKEW_HOT_FILL, SKEW_COLD_FILL = 0.98, 0.92
HOT_MODELS, HOT_SHARE = 3, 0.8  # 80% of the demand for 3 models


@dataclass(frozen=True)
class ChurnOptions:
    churn_rate: float = 2000.0  # node status updates per second
    lifetime_s: float = 2.0
    step_s: float = 3.0
    start_rate: float = 100.0
    max_rate: float = 12800.0
    bisect: int = 3  # the maximum is known to within 1/8 of the last doubling
    p99_target_ms: float = 50.0
    search: bool = True  # False (--quick): one step at `start_rate`
    event_only_s: float = 2.0


# ---- skewed -------------------------------------------------------------------------------


def skewed_partitions(nodes: list[NodeInfo], owners: int) -> list[list[str]]:
    """The node sets the coordinator will give `owners` fresh `schedule` instances: its own
    pure partitioner, run as it runs in `mode_world` (instances known first, with empty
    partitions, then every node registered at once). Which instance gets which set does not
    matter here, only which nodes share a partition. `run_skewed` checks the map it got."""
    ids = [f"o{i}" for i in range(owners)]
    by_name = {n.name: n for n in nodes}
    return [p.nodes for p in rebalance(by_name, ids, rebalance({}, ids, [])) if p.owner]


@dataclass(frozen=True)
class SkewLayout:
    """Each node's pre-filled fraction: the nodes of the `hot` partitions nearly full. Built
    once per benchmark, so every mode starts from the very same cluster state."""

    fills: dict[str, float]
    partitions: list[list[str]]
    hot: list[int]  # indexes into `partitions`

    def fill(self, info: NodeInfo) -> float:
        return self.fills[info.name]

    @property
    def mean(self) -> float:
        return round(sum(self.fills.values()) / max(1, len(self.fills)), 3)

    def follows(self, actual: list[list[str]]) -> bool:
        """Whether `actual` (a map the coordinator published) groups nodes as we assumed:
        if not, hot nodes are spread over partitions and probing is not what was set up."""
        return sorted(map(sorted, actual)) == sorted(map(sorted, self.partitions))


def skewed_layout(nodes: list[NodeInfo], owners: int) -> SkewLayout:
    """Half the partitions (at least one, and at least one left with room) nearly full."""
    parts = skewed_partitions(nodes, owners)
    hot = list(range(max(1, len(parts) // 2))) if len(parts) > 1 else []
    fills = {n.name: SKEW_COLD_FILL for n in nodes}
    for i in hot:
        fills.update((name, SKEW_HOT_FILL) for name in parts[i])
    return SkewLayout(fills, parts, hot)


def skewed_requests(services: list[ServiceSpec], n: int, seed: int) -> list[PlaceRequest]:
    import random

    rng = random.Random(seed + 3)
    small = [s for s in services if s.resources.gpu == 0 and s.resources.cpu <= 1.0]
    hot = small[:HOT_MODELS]
    return [
        PlaceRequest(
            pod=f"skew-{i}",
            spec=rng.choice(hot) if rng.random() < HOT_SHARE else rng.choice(small),
            requested_at=0.0,
        )
        for i in range(n)
    ]


def skewed_capacity(nodes: list[NodeInfo], reqs: list[PlaceRequest], layout: SkewLayout) -> int:
    """How many of `reqs`, in order, one all-knowing best-fit scheduler places before the
    first that finds no room: the benchmark asks for 95% of that, so a good scheduler can place
    everything and a bad one shows in `unschedulable`."""
    from partitions.agents.sim import prefill_pods

    view = PartitionView()
    view.assign(-1, 0, nodes)
    for info in nodes:
        for alloc in prefill_pods(info, layout.fill(info), 2):
            view.record(alloc.pod, info.name, alloc.resources)
    for i, r in enumerate(reqs):
        node: NodeState | None = view.place(r.pod, r.resources, r.model)
        if node is None:
            return i
    return len(reqs)


async def run_skewed(
    mode: str, opts: BenchOptions, nats_url: str, redis_url: str, nodes: list[NodeInfo],
    reqs: list[PlaceRequest], layout: SkewLayout, log_dir: Path, *, nats_pid: int | None,
) -> dict[str, Any]:  # fmt: skip
    async with mode_world(mode, opts, nats_url, redis_url, nodes, log_dir, instances=opts.p,
                          nats_pid=nats_pid, prefill_of=layout.fill) as w:  # fmt: skip
        follows = (layout.follows([p.nodes for p in w.coord.pmap.partitions if p.owner])
                   if mode == "partitioned" else None)  # fmt: skip
        cpu0 = w.cpu()
        d = await drive(w.bus, ENDPOINT[mode], reqs, opts.concurrency, opts.request_timeout_s)
        cpu1 = w.cpu()
        await asyncio.sleep(opts.start_delay_s + 0.2)
        row = summarize(mode, d, w.sim, len(w.procs))
    replies = d.replies
    probed = [lat for lat, r in zip(d.latencies, replies, strict=True)
              if isinstance(r, Placement | Unschedulable) and r.probes > 0]  # fmt: skip
    direct = [lat for lat, r in zip(d.latencies, replies, strict=True)
              if isinstance(r, Placement | Unschedulable) and r.probes == 0]  # fmt: skip
    probes = sum(r.probes for r in replies if isinstance(r, Placement | Unschedulable))
    placed_by_probe = sum(1 for r in replies if isinstance(r, Placement) and r.probes > 0)
    row.update(
        fill_mean=layout.mean,
        # partitioned: the coordinator's map grouped nodes as the layout's hot partitions
        skew_follows_partition_map=follows,
        placements_probed=len(probed),
        probing_exercised=probes > 0,
        # A probe is a reserve sent where the probe cache said there was room (partitioned)
        # or a node probe (sampling): how often it found room.
        probe_cache_hit_rate=round(placed_by_probe / probes, 3) if probes else None,
        probed_p50_ms=round(pct(probed, 0.5) * 1000, 2) if probed else None,
        probed_p99_ms=round(pct(probed, 0.99) * 1000, 2) if probed else None,
        unprobed_p50_ms=round(pct(direct, 0.5) * 1000, 2) if direct else None,
        unprobed_p99_ms=round(pct(direct, 0.99) * 1000, 2) if direct else None,
        cpu_ms_per_placement={k: round((cpu1[k] - cpu0[k]) * 1000 / len(reqs), 3) for k in cpu1},
        projected=False,
    )
    return row


# ---- churn --------------------------------------------------------------------------------


async def status_updates(
    nats_url: str, rate: float, seconds: float, nodes: int, services: int, log_dir: Path
) -> ManagedProcess:
    argv = [sys.executable, "-m", "loadtests.churn_gen", nats_url, str(rate), str(seconds),
            str(nodes), str(services)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return await ManagedProcess.start(argv, name="churn-gen", log_dir=log_dir, env=env, cwd=REPO)


async def sent_count(proc: ManagedProcess) -> tuple[int, float]:
    """How many status updates the generator sent, and the CPU seconds it took to."""
    await proc.wait()
    for line in proc.tail(5).splitlines()[::-1]:
        if line.startswith("sent "):
            words = line.split()
            return int(words[1]), float(words[3]) if len(words) > 3 else 0.0
    return 0, 0.0


async def churn_step(
    w: ModeWorld, mode: str, opts: BenchOptions, co: ChurnOptions, rate: float,
    requests: list[PlaceRequest], tag: str, nats_url: str, log_dir: Path, churn_rate: float,
    c_event_ms: float,
) -> dict[str, Any]:  # fmt: skip
    n = max(1, int(rate * co.step_s))
    reqs = [msgspec.structs.replace(r, pod=f"{tag}-{i}") for i, r in
            enumerate(requests[i % len(requests)] for i in range(n))]  # fmt: skip
    plan = [(i / rate, r) for i, r in enumerate(reqs)]
    ev0, cpu0 = w.sim.stats.events, w.cpu()
    gen = await status_updates(nats_url, churn_rate, co.step_s, opts.nodes, opts.services,
                               log_dir) if churn_rate > 0 else None  # fmt: skip
    sent = await open_loop(w.bus, ENDPOINT[mode], plan, min(10.0, opts.request_timeout_s))
    status, gen_cpu_s = await sent_count(gen) if gen is not None else (0, 0.0)
    cpu1 = w.cpu()
    lat = [x for _, x, _ in sent]
    placed = sum(ok for *_, ok in sent)
    wall = max(co.step_s, max((at + x for at, x, _ in sent), default=0.0))
    events = w.sim.stats.events - ev0 + status
    sched_ms = (cpu1["schedulers"] - cpu0["schedulers"]) * 1000
    p99 = round(pct(lat, 0.99) * 1000, 2)
    return {
        "rate_per_s": round(rate, 1),
        "placements": n,
        "placed": placed,
        "achieved_per_s": round(len(sent) / wall, 1),
        "p50_ms": round(pct(lat, 0.5) * 1000, 2),
        "p99_ms": p99,
        "events_applied": events,
        "status_updates": status,
        "cpu_ms": {k: round((cpu1[k] - cpu0[k]) * 1000, 1) for k in cpu1}
        | {"churn_gen": round(gen_cpu_s * 1000, 1)},
        # scheduler CPU left once every applied event is charged its measured cost (each
        # event is applied once: by its node's owner, or by the one central scheduler)
        "sched_cpu_ms_per_placement": round(max(0.0, sched_ms - events * c_event_ms) / n, 4),
        "ok": p99 <= co.p99_target_ms and placed == n,
        "projected": False,
    }


async def search(
    w: ModeWorld, mode: str, opts: BenchOptions, co: ChurnOptions, requests: list[PlaceRequest],
    nats_url: str, log_dir: Path, churn_rate: float, c_event_ms: float, tag: str,
) -> dict[str, Any]:  # fmt: skip
    """Double the rate until a step misses the target, then bisect between the last
    success and the first miss. A step that misses is run once more: a rate fails when it
    misses twice (at a few dozen placements a second, p99 is the worst of a hundred, and
    one pause of the machine's other tenants is not the rate's fault). Both go in the curve."""
    curve: list[dict[str, Any]] = []
    step = 0

    async def at(rate: float) -> bool:
        nonlocal step
        step += 1
        r = await churn_step(w, mode, opts, co, rate, requests, f"{tag}{step}", nats_url,
                             log_dir, churn_rate, c_event_ms)  # fmt: skip
        curve.append(r)
        log.info("churn %s %s: %s", mode, tag, r)
        await asyncio.sleep(co.lifetime_s + 0.3)  # the step's pods end before the next
        return bool(r["ok"])

    async def passes(rate: float) -> bool:
        return await at(rate) or await at(rate)

    good, bad = 0.0, 0.0
    rate = co.start_rate
    if not co.search:
        await at(rate)
    else:
        while rate <= co.max_rate:
            if await passes(rate):
                good, rate = rate, rate * 2
            else:
                bad = rate
                break
        for _ in range(co.bisect if bad else 0):
            mid = (good + bad) / 2 if good else bad / 2
            if await passes(mid):
                good = mid
            else:
                bad = mid
    best = max((c for c in curve if c["ok"]), key=lambda c: c["rate_per_s"], default=None)
    return {
        "churn_rate_per_s": churn_rate,
        "max_sustained_per_s": round(good, 1) if co.search else None,
        "searched": co.search,
        "p99_target_ms": co.p99_target_ms,
        "sched_cpu_ms_per_placement_at_max": best["sched_cpu_ms_per_placement"] if best else None,
        "curve": sorted(curve, key=lambda c: c["rate_per_s"]),
        "projected": False,
    }


async def run_churn(
    mode: str, opts: BenchOptions, co: ChurnOptions, nats_url: str, redis_url: str,
    nodes: list[NodeInfo], requests: list[PlaceRequest], log_dir: Path, *,
    nats_pid: int | None, extra_churn_rates: tuple[float, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    async with mode_world(mode, opts, nats_url, redis_url, nodes, log_dir, instances=opts.p,
                          nats_pid=nats_pid, lifetime_s=co.lifetime_s) as w:  # fmt: skip
        # The cost of one applied event, alone: status updates only, no placements.
        cpu0 = w.cpu()
        gen = await status_updates(nats_url, co.churn_rate, co.event_only_s, opts.nodes,
                                   opts.services, log_dir)  # fmt: skip
        sent, gen_cpu_s = await sent_count(gen)
        await asyncio.sleep(0.2)
        cpu1 = w.cpu()
        per_event = {
            k: round((cpu1[k] - cpu0[k]) * 1000 / max(1, sent), 4) for k in cpu1
        } | {"churn_gen": round(gen_cpu_s * 1000 / max(1, sent), 4)}
        # Each event is applied once, by the instance that owns its node's partition: the
        # schedulers' CPU per event is the cost of one application, whatever the instances.
        c_event = per_event.get("schedulers", 0.0)
        out = await search(w, mode, opts, co, requests, nats_url, log_dir, co.churn_rate,
                           c_event, "churn")  # fmt: skip
        out["cpu_ms_per_applied_event"] = per_event
        out["sched_cpu_ms_per_applied_event"] = round(c_event, 4)
        out["instances"] = len(w.procs)
        out["event_only"] = {"status_updates": sent, "seconds": co.event_only_s}
        for extra in extra_churn_rates:
            out[f"at_churn_{extra:g}"] = await search(
                w, mode, opts, co, requests, nats_url, log_dir, extra, c_event, f"x{extra:g}-"
            )
        out["overcommitted_nodes"] = len(w.sim.overcommitted_nodes())
    return out
