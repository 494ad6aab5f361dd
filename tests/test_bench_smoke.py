"""The scheduler benchmark's machinery, tiny and for correctness only (speed lives in
`loadtests/bench_schedule.py`): every mode answers every placement exactly once and never
over-commits a node; and, as a property over random clusters and bursts, several real
`schedule` instances placing concurrently across partitions — reserving in each other's
partitions when their own is full — never over-commit a node and answer each placement once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from controlplane import build
from kernel import endpoints as ep
from kernel.config import Config
from kernel.errors import RemoteError
from kernel.messages import (
    NodeInfo,
    Placement,
    PlaceRequest,
    Resources,
    ServiceSpec,
    Unschedulable,
)
from loadtests.bench_harness import MODES, BenchOptions, wait_beating, wait_partitioned, world
from loadtests.bench_report import write
from loadtests.bench_schedule import run_benchmark

MODE_FIELDS = {"placements_per_s", "p50_ms", "p99_ms", "probes_per_placement", "unschedulable",
               "overcommitted_nodes", "cached_model_hits", "cpu_ms_per_placement"}  # fmt: skip


async def test_tiny_benchmark_all_modes(nats_url: str, redis_url: str, tmp_path: Path) -> None:
    # --quick's scenarios: skewed and churn for every mode, one churn step (no rate search)
    opts = BenchOptions(nodes=200, placements=300, partitions=2, concurrency=16, out=tmp_path,
                        settle_s=1.2, churn_search=False, churn_step_s=1.0,
                        churn_lifetime_s=0.5)  # fmt: skip
    out = write(await run_benchmark(opts, nats_url=nats_url, redis_url=redis_url), opts,
                "smoke")  # fmt: skip
    written = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert written["ratios"] == out["ratios"]
    runs = [written[m] for m in MODES] + list(written["scaling"].values())
    assert set(written["scaling"]) == {"1", "2"}
    for run in runs:
        assert MODE_FIELDS <= set(run), run
        assert run["overcommitted_nodes"] == 0, run
        assert run["errors"] == 0, run
        assert run["placed"] + run["unschedulable"] == run["placements"] == 300, run
        assert run["placements_match_sim"] and run["ghost_pods"] == 0, run
        assert run["duplicate_starts"] == 0, run
    assert written["sampling"]["probes_per_placement"] >= 2.0  # d=2 per try, at least one try
    assert written["ratios"]["reference"] == "central-indexed"
    for mode in ("partitioned", "kube-scheduler", "central", "sampling"):
        assert isinstance(written["ratios"]["placements_per_s"][mode], float), mode
    assert isinstance(written["ratios"]["scaling_1_to_2"], float)
    assert written["nats_floor_rps"] > 0
    for mode in MODES:
        skewed, churn = written["skewed"][mode], written["churn"][mode]
        assert skewed["overcommitted_nodes"] == 0 and skewed["errors"] == 0, skewed
        assert skewed["placed"] + skewed["unschedulable"] == skewed["placements"], skewed
        assert churn["overcommitted_nodes"] == 0, churn
        assert churn["curve"] and churn["curve"][0]["events_applied"] > 0, churn
        assert churn["cpu_ms_per_applied_event"]["schedulers"] >= 0, churn
        assert mode in written["churn"]["max_sustained"]
    # The skew follows partition membership: the instance owning the full partition probes.
    skp = written["skewed"]["partitioned"]
    assert skp["skew_follows_partition_map"] is True, skp
    assert skp["probing_exercised"] is True and skp["probes_per_placement"] > 0, skp
    assert skp["placements_probed"] > 0 and skp["probed_p50_ms"] is not None, skp
    assert skp["probe_cache_hit_rate"] is not None, skp
    assert written["goals"]["skewed_probes_per_placement_le_0.2"]["probing_exercised"] is True
    points = written["model"]["points"]
    assert points and all("error_pct" in p and p["projected"] is False for p in points)
    assert all(r["projected"] is True for r in written["model"]["projection"]["rows"])
    for name, goal in written["goals"].items():
        if isinstance(goal, dict):  # every goal says its target, what was measured, if met
            assert {"target", "measured", "met"} <= set(goal), name
    assert written["goals"]["no_overcommit_anywhere"] is True
    assert written["goals"]["every_placement_answered_once"] is True


# ---- several real schedule instances, concurrent placements, cross-partition reserves ----


def cluster(caps: list[tuple[float, int]]) -> list[NodeInfo]:
    return [NodeInfo(name=f"hyp-{i}", capacity=Resources(cpu=c, memory_mb=m), backend="sim")
            for i, (c, m) in enumerate(caps)]


def requests(sizes: list[tuple[float, int]], tag: str) -> list[PlaceRequest]:
    return [
        PlaceRequest(pod=f"{tag}-{i}",
                     spec=ServiceSpec(name=f"hyp-svc-{i % 3}", command=["sim"],
                                      resources=Resources(cpu=c, memory_mb=m)),
                     requested_at=0.0)
        for i, (c, m) in enumerate(sizes)
    ]  # fmt: skip


async def place_concurrently(
    nats_url: str, redis_url: str, infos: list[NodeInfo], reqs: list[PlaceRequest], n: int,
    *, fill: float = 0.0,
) -> dict[str, object]:  # fmt: skip
    """Real coordinator, `n` real schedule instances, a SimCluster pre-filled to `fill`;
    every request sent at once."""
    opts = BenchOptions(nodes=len(infos), start_delay_s=0.01, fill=fill)
    async with world(opts, nats_url, redis_url, infos, start_sim=False) as (coord, sim, bus, beats):
        config = Config(nats_url=nats_url)
        instances = [await build.schedule(config, f"hyp-{i}") for i in range(n)]
        try:
            for inst in instances:
                await inst.start()
            await wait_beating(beats, [i.id for i in instances], 20.0)
            await sim.start()  # nodes appear once every instance is known: one adoption each
            await wait_partitioned(coord, beats, [i.id for i in instances], len(infos), 20.0)
            await asyncio.sleep(1.2)  # one summary broadcast: warm probe caches

            async def one(req: PlaceRequest) -> object:
                try:
                    return await bus.call(ep.PLACE, req, timeout=10.0)
                except RemoteError as exc:
                    return exc

            replies = await asyncio.gather(*(one(r) for r in reqs))
            await asyncio.sleep(0.05)
            return {
                "replies": replies,
                "overcommitted": sim.overcommitted_nodes(),
                "started": sim.started_pods(),
                "duplicates": sim.stats.duplicate_starts,
            }
        finally:
            await asyncio.gather(*(i.stop() for i in instances), return_exceptions=True)


def check_answered_once(reqs: list[PlaceRequest], res: dict[str, object]) -> int:
    replies = res["replies"]
    assert isinstance(replies, list)
    errors = [r for r in replies if isinstance(r, Exception)]
    assert not errors, errors
    assert all(isinstance(r, Placement | Unschedulable) for r in replies)
    assert [r.pod for r in replies] == [q.pod for q in reqs]  # one answer per request
    placed = {r.pod: r.node for r in replies if isinstance(r, Placement)}
    assert res["overcommitted"] == [], "a node was over-committed"
    assert res["duplicates"] == 0, "a pod was started twice"
    # Every Placement runs where it says, and nothing runs without a Placement.
    assert res["started"] == placed
    return sum(r.probes for r in replies)


caps = st.lists(st.tuples(st.sampled_from([1.0, 2.0, 4.0]), st.sampled_from([2048, 4096])),
                min_size=3, max_size=10)  # fmt: skip
sizes = st.lists(st.tuples(st.sampled_from([0.5, 1.0, 1.5]), st.sampled_from([256, 1024])),
                 min_size=1, max_size=40)  # fmt: skip


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    caps=caps,
    sizes=sizes,
    n=st.integers(min_value=2, max_value=3),
    fill=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_property_no_overcommit_every_placement_answered_once(
    nats_url: str, redis_url: str, caps: list[tuple[float, int]],
    sizes: list[tuple[float, int]], n: int, fill: float,
) -> None:  # fmt: skip
    reqs = requests(sizes, "hyp")
    res = asyncio.run(place_concurrently(nats_url, redis_url, cluster(caps), reqs, n, fill=fill))
    probes = check_answered_once(reqs, res)
    event("cross-partition reserves" if probes else "own partitions only")


@pytest.mark.timeout(60)
async def test_full_partition_reserves_in_another(nats_url: str, redis_url: str) -> None:
    """Demand at 1.5x the cluster: each instance's own partition fills, so it must reserve in
    the other's, and still nothing is over-committed and each request is answered once."""
    infos = cluster([(2.0, 4096)] * 6)
    reqs = requests([(1.0, 512)] * 18, "full")
    res = await place_concurrently(nats_url, redis_url, infos, reqs, 2)
    probes = check_answered_once(reqs, res)
    placed = sum(isinstance(r, Placement) for r in res["replies"])  # type: ignore[union-attr]
    assert placed == 12, "the cluster holds exactly 12 such pods, and all were used"
    assert probes > 0, "full partitions sent reserves to the other partition"
