"""`scale` and `route` sharded by service (issue 13, item 1). The shard assignment and the
fences as tables with no network; on the embedded stack with 2 `scale` and 2 `route`
instances (real NATS, Redis, pods): a cold start through them, a dead owner's shards taken
over within 2 s, and the receivers refusing what a stale owner sends (a placement, a stop,
an endpoint set) while the service keeps serving; through `fnplane up --scale-min 2
--route-min 2` as a user runs it, the owners of a service's shards SIGKILLed mid-burst with
no request lost. The reclaim across shards is the faults row `cluster-full-of-idle-pods`
with `--scale-min 2` (loadtests/faults.py), run here at smoke size."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from activator.services import ServiceTable
from controlplane.sharding import assign
from controlplane.stack import Stack
from functions.route.core import EndpointTable
from functions.route.instance import RouteInstance
from functions.scale.instance import ScaleInstance
from kernel import endpoints as ep
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    Empty,
    Endpoint,
    Endpoints,
    PlaceRequest,
    PodEvent,
    PodsAnnounced,
    Shard,
    ShardMap,
    StopPod,
)
from kernel.procs import descendants
from kernel.revisions import revision_spec
from kernel.shards import ShardFence, shard_of
from tests.stackutil import (
    REPO,
    admin,
    deploy,
    describe,
    post_status,
    sample_spec,
    stack_config,
    wait_until,
)
from tests.test_fnplane_up import Up

BODY = (REPO / "examples/sample/request_v2.json").read_bytes()


# ---- the assignment and the fences, pure ---------------------------------------------------


def _owners(shards: list[Shard]) -> collections.Counter[str]:
    return collections.Counter(s.owner for s in shards)


def test_shards_spread_evenly_move_little_and_bump_epochs_only_when_they_move() -> None:
    assert {s.epoch for s in assign(64, [], [])} == {0}, "never owned: nothing to fence"
    one = assign(64, ["a"], [])
    assert _owners(one) == {"a": 64} and {s.epoch for s in one} == {1}
    two = assign(64, ["a", "b"], one)
    assert _owners(two) == {"a": 32, "b": 32}
    moved = [s for s, t in zip(one, two, strict=True) if s.owner != t.owner]
    assert len(moved) == 32, "only the new instance's share moves"
    assert all(t.epoch == s.epoch + (s.owner != t.owner) for s, t in zip(one, two, strict=True))
    assert assign(64, ["a", "b"], two) == two, "a balanced map stays as it is"
    # b dies: its shards go to a with new epochs; a's keep theirs.
    alone = assign(64, ["a"], two)
    assert _owners(alone) == {"a": 64}
    assert all(t.epoch == s.epoch + (s.owner == "b") for s, t in zip(two, alone, strict=True))
    # Nobody left: unowned, epochs bumped, so whoever comes next fences the old owner.
    empty = assign(64, [], alone)
    assert _owners(empty) == {"": 64} and all(
        t.epoch == s.epoch + 1 for s, t in zip(alone, empty, strict=True))


def test_a_fence_refuses_only_an_epoch_older_than_the_shards() -> None:
    fence = ShardFence()
    assert fence.check("scale", "svc", 0) is None, "no map yet: nothing is known stale"
    shards = [Shard(id=i, epoch=3 if i == shard_of("svc") else 1, owner="x") for i in range(64)]
    assert fence.apply(ShardMap(version=2, count=64, shards={"scale": shards}))
    assert not fence.apply(ShardMap(version=1, count=64)), "an older map is ignored"
    assert not fence.apply(ShardMap(version=10**9, count=64)), "an absurd version is refused"
    assert fence.check("scale", "svc", 2) is not None
    assert fence.check("scale", "svc", 3) is None and fence.check("scale", "svc", 4) is None
    assert fence.check("route", "svc", 0) is None, "route's epochs are its own"


def _eps(version: int, epoch: int, pods: list[str]) -> Endpoints:
    return Endpoints(service="svc", version=version, epoch=epoch, endpoints=[
        Endpoint(pod=p, url=f"http://{p}", node="n1", container_concurrency=0) for p in pods])


def test_endpoint_sets_order_by_epoch_then_version() -> None:
    from activator.direct import DirectPath

    table = ServiceTable(buffer_size=10, direct=DirectPath())
    table.upsert(sample_spec("svc"))
    table.apply_endpoints(_eps(50, 1, ["old"]))
    table.apply_endpoints(_eps(3, 2, ["new"]))  # a new owner, a lower sequence: newer
    assert [e.pod for e in table["svc"].endpoints.endpoints] == ["new"]
    table.apply_endpoints(_eps(51, 1, ["stale"]))  # the old owner again: older
    assert [e.pod for e in table["svc"].endpoints.endpoints] == ["new"]


def test_a_new_route_owner_rebuilds_from_the_snapshot_and_the_announcement() -> None:
    stored = _eps(7, 1, ["gone", "kept"])
    ready = PodEvent(pod="born", service="svc", node="n1", state="ready", url="http://born")
    also = PodEvent(pod="kept", service="svc", node="n1", state="ready", url="http://kept")
    table = EndpointTable()
    out = table.rebuild({shard_of("svc")}, 64, [stored],
                        [PodsAnnounced(nodes=["n1"], events=[ready, also])])
    assert [(e.service, [x.pod for x in e.endpoints]) for e in out] == [("svc",
                                                                         ["born", "kept"])]
    assert out[0].version > stored.version


# ---- the embedded stack with two of each ----------------------------------------------------


async def _post(http: aiohttp.ClientSession, url: str) -> int | str:
    return await post_status(http, url, data=BODY)


async def _shard_map(nats_url: str) -> ShardMap:
    async with admin(nats_url) as bus:
        smap: ShardMap = await bus.call(ep.SHARD_MAP_GET, Empty(), timeout=5)
    return smap


def _shard(smap: ShardMap, kind: str, service: str) -> Shard:
    return smap.shards[kind][shard_of(service, smap.count)]


async def test_a_dead_owners_shards_move_within_2s_and_its_stale_actions_are_refused(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    cfg = stack_config(tmp_path)
    cfg = replace(cfg, coordinator=replace(cfg.coordinator, scale_min=2, route_min=2))
    stack = Stack(cfg, nats_url=nats_url, redis_url=redis_url)
    await stack.start()
    try:
        spec = sample_spec("sharded")
        REV = "sharded-00001"
        await deploy(nats_url, spec)
        url = f"{stack.url}/v2/models/sharded/infer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            assert await _post(http, url) == 200, "a cold start through 2 scale, 2 route"
            smap = await wait_until(lambda: _shard_map(nats_url),
                                    lambda m: len({s.owner for s in m.shards["scale"]}) == 2
                                    and len({s.owner for s in m.shards["route"]}) == 2,
                                    timeout=10, what="two owners of each function")
            old_scale, old_route = _shard(smap, "scale", REV), _shard(smap, "route", REV)
            victims = [c for c in stack.components
                       if isinstance(c, ScaleInstance | RouteInstance)
                       and c.id in (old_scale.owner, old_route.owner)]
            assert len(victims) == 2
            # Silent, as a hung or cut-off instance: only missed heartbeats tell.
            for v in victims:
                await v.tasks.close()
                await v.bus.close()
            t0 = time.monotonic()
            smap = await wait_until(
                lambda: _shard_map(nats_url),
                lambda m: _shard(m, "scale", REV).owner not in ("", old_scale.owner)
                and _shard(m, "route", REV).owner not in ("", old_route.owner),
                timeout=5, what="the dead owners' shards taken over")
            took = time.monotonic() - t0
            assert took <= 2.0, f"takeover took {took:.2f}s"
            assert _shard(smap, "scale", REV).epoch > old_scale.epoch
            # Scaling and routing go on under the new owners.
            assert [await _post(http, url) for _ in range(5)] == [200] * 5
            status = await wait_until(lambda: describe(nats_url, "sharded"),
                                      lambda s: any(p.state == "ready" for p in s.pods),
                                      timeout=2, what="the new owner knows the running pod")
            pod = next(p for p in status.pods if p.state == "ready")
            async with admin(nats_url) as bus:
                # The stale `scale` owner's placement and stop are refused...
                with pytest.raises(RemoteError) as place:
                    await bus.call(ep.PLACE, PlaceRequest(pod="sharded-stale",
                                                          spec=revision_spec(spec, 1),
                                                          requested_at=time.time(),
                                                          epoch=old_scale.epoch), timeout=5)
                assert place.value.code is ErrorCode.STALE_EPOCH
                with pytest.raises(RemoteError) as stop:
                    await bus.call(ep.NODE_STOP, StopPod(pod=pod.pod, service=REV,
                                                         epoch=old_scale.epoch),
                                   timeout=5, node=pod.node)
                assert stop.value.code is ErrorCode.STALE_EPOCH
                # ...and the stale `route` owner's endpoint set (no pods, a version far
                # ahead) is not taken by the activator.
                await bus.send(ep.ENDPOINTS, Endpoints(service=REV, version=10_000,
                                                       epoch=old_route.epoch, endpoints=[]),
                               service=REV)
                await asyncio.sleep(0.3)
            assert [await _post(http, url) for _ in range(5)] == [200] * 5
            after = await describe(nats_url, "sharded")
            assert pod.pod in {p.pod for p in after.pods if p.state == "ready"}, \
                "the stale stop did not land"
            assert "sharded-stale" not in {p.pod for p in after.pods}
            assert stack.activator is not None
            held = stack.activator.services[REV].endpoints
            assert held is not None and held.endpoints
            assert held.epoch == _shard(smap, "route", REV).epoch
    finally:
        await stack.stop()


# ---- fnplane up --scale-min 2 --route-min 2 ------------------------------------------------


def _instance_pids(up: Up) -> dict[str, int]:
    """Control-function instance processes (`controlplane.instance KIND --id ID`) by id."""
    found: dict[str, int] = {}
    for pid in descendants(up.proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode() for a in args if a]
        if "controlplane.instance" in words and "--id" in words:
            found[words[words.index("--id") + 1]] = pid
    return found


def _status(up: Up) -> dict[str, object]:
    out = up.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _owner(st: dict[str, object], kind: str, service: str) -> dict[str, object]:
    shards = st["shards"]  # type: ignore[index]
    return shards["shards"][kind][shard_of(service, shards["count"])]  # type: ignore[index]


async def test_up_with_two_scale_and_two_route_loses_nothing_when_owners_die_mid_burst(
    tmp_path: Path,
) -> None:
    up = Up(tmp_path / "state", extra=["--scale-min", "2", "--route-min", "2"])
    try:
        out = up.cli("deploy", "sample", "--concurrency-limit", "2", "--scale-max", "6",
                     "--env", "SAMPLE_LATENCY_MS=100", "--scale-window", "6s")
        assert out.returncode == 0, out.stderr
        url = f"http://127.0.0.1:{up.port}/v2/models/sample/infer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            assert await _post(http, url) == 200, "a cold start through 2 scale, 2 route"
            st = await wait_until(
                lambda: asyncio.to_thread(_status, up),
                lambda s: all(len({i["instance"] for i in s["instances"]  # type: ignore[index]
                                   if i["kind"] == k and i["shards"]}) == 2
                              for k in ("scale", "route")),
                timeout=20, what="2 scale and 2 route instances, each owning shards")
            shown = up.cli("status").stdout
            assert "Shard map version" in shown and "scale" in shown, shown
            victims = {k: _owner(st, k, "sample-00001")["owner"] for k in ("scale", "route")}
            pids = _instance_pids(up)
            assert set(victims.values()) <= set(pids), (victims, pids)
            tasks = [asyncio.create_task(_post(http, url)) for _ in range(200)]
            await asyncio.sleep(1.0)
            for instance in victims.values():
                os.kill(pids[str(instance)], signal.SIGKILL)
            t0 = time.monotonic()
            await wait_until(
                lambda: asyncio.to_thread(_status, up),
                lambda s: all(_owner(s, k, "sample-00001")["owner"] not in ("", victims[k])
                              for k in victims),
                timeout=10, what="the killed owners' shards taken over")
            took = time.monotonic() - t0
            results = await asyncio.gather(*tasks)
            assert collections.Counter(results) == {200: 200}, "0 requests lost"
            # `fnplane status --json` runs a CLI process per poll: allow for it.
            assert took <= 2.0 + 1.5, f"takeover seen after {took:.2f}s"
            desc = json.loads(up.cli("describe", "sample", "--json").stdout)
            assert desc["ready_pods"] >= 2, "it kept scaling under the new owner"
    finally:
        assert up.interrupt() == 0


def test_the_cluster_full_fault_row_passes_with_two_scale_instances() -> None:
    """Its idle pods belong to another `scale` instance's shard: room comes from asking it."""
    import subprocess

    cmd = [sys.executable, "-m", "loadtests.faults", "--quick", "--json", "--only",
           "cluster-full", "--scale-min", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row = result["faults"][0]
    assert row["fault"] == "cluster-full-of-idle-pods"
    assert row["ok"] == row["sent"] and row["lost"] == 0 and row["hung"] == 0, row
    assert "(asked)" in proc.stderr, "the idle pods were stopped by their shard's owner"
