"""Proxy ↔ direct mode, end to end on the embedded stack: with spare capacity (Knative's
target-burst-capacity rule) `scale` tells `route`, `route` tells the gateway, and requests
go straight to pods with the activator out of the path; when load eats the spare capacity
traffic goes back through the activator. Real nats-server, Redis and sample-model pods."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import nats

from activator.nats_ingress import STATUS_HEADER
from kernel import endpoints as ep
from kernel.messages import ScalingSpec
from tests.stackutil import deploy, running_stack, sample_spec, wait_until

BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}


async def _path(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url, json=BODY) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Fnplane-Path"]


async def test_activator_leaves_the_path_once_a_pod_is_ready_with_tbc_zero(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    spec = sample_spec(container_concurrency=4, scaling=ScalingSpec(
        min_scale=0, stable_window_s=6, scale_to_zero_grace_s=30, target_burst_capacity=0))
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        url = f"{stack.url}/v2/models/sample/infer"
        gw = stack.activator  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http:
            assert await _path(http, url) == "activator", "the cold request is buffered"
            await wait_until(lambda: _mode(gw), lambda m: m == "direct", timeout=10,
                             what="direct mode")
            paths = [await _path(http, url) for _ in range(5)]
        assert paths == ["direct"] * 5
        # `svc.invoke` takes the same handler, so it goes direct too.
        nc = await nats.connect(nats_url)
        try:
            replies = [await nc.request(ep.INVOKE.subject_for(service="sample"),
                                        json.dumps(BODY).encode(), timeout=30)
                       for _ in range(3)]
        finally:
            await nc.close()
        assert [(r.headers or {}).get("Fnplane-Path") for r in replies] == ["direct"] * 3
        assert [(r.headers or {}).get(STATUS_HEADER) for r in replies] == ["200"] * 3


async def test_activator_stays_in_path_with_tbc_minus_one(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    spec = sample_spec(container_concurrency=4, scaling=ScalingSpec(
        min_scale=0, stable_window_s=6, scale_to_zero_grace_s=30, target_burst_capacity=-1))
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        url = f"{stack.url}/v2/models/sample/infer"
        async with aiohttp.ClientSession() as http:
            await _path(http, url)
            await asyncio.sleep(1.5)  # several scale ticks: the mode must not change
            paths = [await _path(http, url) for _ in range(5)]
        assert paths == ["activator"] * 5


async def test_load_above_burst_capacity_brings_the_activator_back(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """TBC 2 with one pod of container concurrency 8: idle → EBC = 8 − 2 − 0 ≥ 0, direct;
    12 requests in flight → EBC < 0, proxy (and the service scales out)."""
    spec = sample_spec(
        container_concurrency=8,
        env={"SAMPLE_LATENCY_MS": "300"},
        scaling=ScalingSpec(min_scale=0, max_scale=1, stable_window_s=6,
                            scale_to_zero_grace_s=30, target_burst_capacity=2),
    )
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        url = f"{stack.url}/v2/models/sample/infer"
        gw = stack.activator  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http:
            await _path(http, url)
            await wait_until(lambda: _mode(gw), lambda m: m == "direct", timeout=10,
                             what="direct mode while idle")
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    async with http.post(url, json=BODY) as r:
                        assert r.status == 200
                        await r.read()

            workers = [asyncio.create_task(load()) for _ in range(12)]
            try:
                await wait_until(lambda: _mode(gw), lambda m: m == "proxy", timeout=15,
                                 what="back to proxy mode under load")
            finally:
                stop.set()
                await asyncio.gather(*workers)
            # Direct and activator paths together never put more than 8 on the pod.
            for ep in gw.services["sample-00001"].endpoints.endpoints:
                async with http.get(f"{ep.url}/stats") as r:
                    stats = await r.json()
                assert 1 <= stats["max_in_flight"] <= 8, stats
        assert gw.services["sample-00001"].throttler.violations == 0


async def _mode(gw) -> str:
    return gw.services["sample-00001"].mode
