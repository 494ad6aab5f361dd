"""Reclaiming idle capacity (beyond Knative): which idle pods of other services make room for
a service with requests waiting, decided with no NATS; and, on the embedded stack with real
pods, a full cluster that serves a new burst by stopping another service's idle pods, while
a pod that fits nowhere keeps its requests buffered until their timeout instead of failing
them at once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

from controlplane.stack import Stack
from functions.scale.core import ServiceScaler
from functions.scale.reclaim import Candidate, pick
from kernel.config import NodesConfig
from kernel.messages import Demand, PodEvent, Resources, ScalingSpec, ServiceSpec
from tests.stackutil import REPO, deploy, describe, sample_spec, stack_config, wait_until

HALF = Resources(cpu=0.5, memory_mb=128)
BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}


def cand(pod: str, node: str, idle_since: float, cpu: float = 0.5) -> Candidate:
    return Candidate(pod=pod, service="idle", node=node,
                     resources=Resources(cpu=cpu, memory_mb=128), idle_since=idle_since)


def test_victims_come_from_one_node_fewest_first_then_longest_idle() -> None:
    need = Resources(cpu=1.0, memory_mb=256)
    got = pick(need, [cand("a1", "n1", 5), cand("a2", "n1", 1), cand("a3", "n1", 3),
                      cand("b1", "n2", 9, cpu=1.0), cand("b2", "n2", 0)])
    # n2 frees enough with 2 pods as n1 does; n1 is first by name, its two longest idle go.
    assert [c.pod for c in got] == ["a2", "a3"]
    big = [cand("c1", "n3", 0, cpu=2.0)]
    one_cpu = Resources(cpu=1.0, memory_mb=128)
    assert [c.pod for c in pick(one_cpu, [cand("a1", "n1", 0), *big])] == ["c1"]


def test_no_victims_when_no_single_node_can_make_room() -> None:
    need = Resources(cpu=1.0, memory_mb=128)
    assert pick(need, [cand("a1", "n1", 0), cand("b1", "n2", 0)]) == []
    assert pick(Resources(cpu=0.5, memory_mb=128, gpu=1), [cand("a1", "n1", 0)]) == []


def _ready(scaler: ServiceScaler, pod: str, node: str, now: float) -> None:
    scaler.on_pod_event(PodEvent(pod=pod, service="idle", node=node, state="ready", ts=now), now)


def test_only_idle_pods_above_min_scale_are_offered_and_stay_stopped() -> None:
    spec = ServiceSpec(name="idle", command=["serve"],
                       scaling=ScalingSpec(min_scale=1, target_concurrency=10.0,
                                           scale_to_zero_grace_s=600))

    def busy_then_idle() -> ServiceScaler:
        scaler = ServiceScaler.for_spec(spec, now=0.0)
        for i in range(3):
            _ready(scaler, f"p{i}", "n1", 0.0)
        assert len(scaler.reclaimable(0.5, 1.0)) == 2, "min-scale keeps one"
        scaler.observe(Demand(service="idle", reporter="a", buffered=0, in_flight=60,
                              requests=60, ts=1.0))
        assert scaler.reclaimable(1.0, 1.0) == [], "a service with requests is not idle"
        scaler.plan(1.0, 1.0)
        scaler.observe(Demand(service="idle", reporter="a", buffered=0, in_flight=0,
                              requests=0, ts=2.0))
        scaler.reclaim(scaler.reclaimable(2.0, 1.0)[0].pod)
        return scaler

    uncapped = busy_then_idle()
    uncapped.reclaimed_cap = None
    assert uncapped.plan(2.5, 1.0).start >= 1, "the stable window alone would start it again"
    scaler = busy_then_idle()
    assert scaler.plan(2.5, 1.0).start == 0, "a reclaimed pod stays stopped while idle"
    victim = next(p for p in scaler.pods.values() if p.state == "terminating")
    scaler.observe(Demand(service="idle", reporter="a", buffered=5, in_flight=0, requests=5,
                          ts=3.0))
    scaler.on_pod_event(PodEvent(pod=victim.pod, service="idle", node="n1", state="stopped",
                                 ts=3.0), 3.0)
    assert scaler.plan(3.0, 1.0).start >= 1, "with requests again, the autoscaler decides"


def _one_small_node(state: Path) -> Stack:
    cfg = stack_config(state, request_timeout_s=20.0)
    cfg = replace(cfg, nodes=NodesConfig(count=1, capacity=Resources(cpu=1.0, memory_mb=1024),
                                         workdir=REPO))
    return Stack(cfg, nats_url=None, redis_url=None)


async def _post(http: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with http.post(url, json=BODY) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def test_a_full_cluster_makes_room_from_idle_pods_of_another_service(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    stack = _one_small_node(tmp_path)
    stack.nats_url, stack.redis_url = nats_url, redis_url
    # Each takes half the node's cpu: the idle service's two pods fill it.
    idle = sample_spec("idle", resources=HALF, container_concurrency=1,
                       env={"SAMPLE_LATENCY_MS": "1000"},
                       scaling=ScalingSpec(min_scale=0, max_scale=2, target_concurrency=1,
                                           stable_window_s=60, scale_to_zero_grace_s=600))
    busy = sample_spec("busy", resources=HALF)
    await stack.start()
    try:
        await deploy(nats_url, idle)
        async with aiohttp.ClientSession() as http:  # busy once: two pods
            url = f"{stack.url}/v2/models/idle/infer"
            assert await asyncio.gather(*(_post(http, url) for _ in range(4))) == [200] * 4
        await wait_until(lambda: describe(nats_url, "idle"), lambda s: s.ready_pods == 2,
                         timeout=20, what="the idle service's two pods fill the node")
        await deploy(nats_url, busy)
        async with aiohttp.ClientSession() as http:
            url = f"{stack.url}/v2/models/busy/infer"
            async with asyncio.timeout(40):
                results = await asyncio.gather(*(_post(http, url) for _ in range(20)))
        assert results == [200] * 20, results
        st = await describe(nats_url, "idle")
        assert st.ready_pods <= 1, "an idle pod gave its room"
        assert stack.components  # the stack still runs
    finally:
        await stack.stop()


async def test_a_pod_that_fits_nowhere_keeps_requests_buffered_until_their_timeout(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    stack = _one_small_node(tmp_path)
    stack.nats_url, stack.redis_url = nats_url, redis_url
    stack.config = replace(stack.config, activator=replace(stack.config.activator,
                                                           request_timeout_s=3.0))
    await stack.start()
    try:
        await deploy(nats_url, sample_spec("huge", resources=Resources(cpu=2.0, memory_mb=128)))
        async with aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            async with asyncio.timeout(20):
                async with http.post(f"{stack.url}/v2/models/huge/infer", json=BODY) as r:
                    body = await r.json()
            waited = time.monotonic() - t0
        assert r.status == 503 and r.headers["Retry-After"], body
        assert "within 3s" in body["error"], body
        # Not failed at the first "no room": it waited for a placement until its timeout.
        assert waited >= 2.5, waited
        st = await describe(nats_url, "huge")
        assert "room" in st.last_error or "no node" in st.last_error, st.last_error
    finally:
        await stack.stop()
