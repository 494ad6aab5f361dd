"""Scale from zero, end to end: the whole embedded stack (coordinator, scale, schedule,
route, activator, two local nodes) against a real nats-server and Redis; pods are real
processes running the sample model. Each test checks answers against the model computed
in this process."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from examples.sample.model import load_model
from kernel import endpoints as ep
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import DeployRequest, ScalingSpec
from tests.stackutil import (
    REPO,
    admin,
    deploy,
    describe,
    running_stack,
    sample_spec,
    wait_until,
)

MODEL = load_model()
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 4.4, 1.4]]


def v2_body(rows: list[list[float]] = ROWS) -> dict:
    return {"inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP32",
                        "data": rows}]}


def expected(rows: list[list[float]] = ROWS) -> np.ndarray:
    return MODEL.predict(np.asarray(rows, dtype=np.float32))


async def test_cold_request_answered_with_the_models_output(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec())
        st = await describe(nats_url, "sample")
        assert st.ready_pods == 0, "a min-scale 0 service starts with no pod"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/sample/infer", json=v2_body()) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            out = np.asarray(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
            assert np.allclose(out, expected(), atol=1e-6)

            instances = json.loads((REPO / "examples/sample/request_v1.json").read_text())
            async with http.post(f"{stack.url}/v1/models/sample:predict", json=instances) as r:
                assert r.status == 200, await r.text()
                preds = (await r.json())["predictions"]
            rows = instances["instances"]
            assert np.allclose(np.asarray(preds), expected(rows), atol=1e-6)

        st = await wait_until(
            lambda: describe(nats_url, "sample"),
            lambda s: s.last_cold_start is not None,
            timeout=5,
            what="the cold start record",
        )
        cs = st.last_cold_start
        assert cs is not None
        assert cs.request_in <= cs.placement_decided <= cs.process_spawned <= cs.ready
        assert cs.ready <= cs.first_byte_out
        assert st.ready_pods == 1


async def test_burst_of_300_at_zero_honours_max_scale_and_container_concurrency(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    cc, max_scale = 4, 3
    spec = sample_spec(
        container_concurrency=cc,
        env={"SAMPLE_LATENCY_MS": "30"},
        scaling=ScalingSpec(min_scale=0, max_scale=max_scale, target_concurrency=cc,
                            stable_window_s=6, scale_to_zero_grace_s=1),
    )
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        max_pods = 0
        done = asyncio.Event()

        async def watch_pods() -> None:
            nonlocal max_pods
            while not done.is_set():
                st = await describe(nats_url, "sample")
                max_pods = max(max_pods, len(st.pods))
                await asyncio.sleep(0.05)

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(i: int) -> tuple[int, str, list[float]]:
                rows = [[4.0 + i % 5, 3.0, 1.0 + i % 3, 0.5]]
                async with http.post(f"{stack.url}/v2/models/sample/infer",
                                     json=v2_body(rows)) as r:
                    body = await r.json()
                    data = body["outputs"][0]["data"] if r.status == 200 else []
                    return r.status, r.headers.get("X-Fnplane-Pod", ""), data

            watcher = asyncio.create_task(watch_pods())
            results = await asyncio.gather(*(one(i) for i in range(300)))
            done.set()
            await watcher
            statuses = collections.Counter(s for s, _, _ in results)
            assert statuses == {200: 300}, statuses
            for i, (_, _, data) in enumerate(results):
                assert np.allclose(data, expected([[4.0 + i % 5, 3.0, 1.0 + i % 3, 0.5]])[0])
            pods_used = {p for _, p, _ in results}
            assert 1 <= len(pods_used) <= max_scale
            assert max_pods <= max_scale

            # Each pod counted its own requests in flight: never more than cc at once.
            st = await describe(nats_url, "sample")
            for pod in st.pods:
                if pod.state != "ready":
                    continue
                async with http.get(f"{pod.url}/stats") as r:
                    stats = await r.json()
                assert 1 <= stats["max_in_flight"] <= cc, (pod.pod, stats)
        gw = stack.activator  # type: ignore[union-attr]
        assert gw.services["sample-00001"].throttler.violations == 0


async def test_service_scales_back_to_zero_after_the_grace_period(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/sample/infer", json=v2_body()) as r:
                assert r.status == 200
        # Stable window 6 s with no traffic, then the 1 s grace: back to zero pods.
        st = await wait_until(
            lambda: describe(nats_url, "sample"),
            lambda s: not s.pods and s.desired_pods == 0,
            timeout=30,
            what="scale to zero",
        )
        assert st.ready_pods == 0
        # And from zero again.
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/sample/infer", json=v2_body()) as r:
                assert r.status == 200


async def test_unknown_service_404_and_malformed_body_400(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/nope/infer", json=v2_body()) as r:
                assert r.status == 404
                assert "nope" in (await r.json())["error"]
            async with http.post(f"{stack.url}/v2/models/sample/infer", data=b"{not json") as r:
                assert r.status == 400
                assert "JSON" in (await r.json())["error"]
            async with http.post(f"{stack.url}/v2/models/sample/infer", json={"x": 1}) as r:
                assert r.status == 400
            async with http.post(f"{stack.url}/v1/models/sample:predict", json=[1, 2]) as r:
                assert r.status == 400
        # Bad input never woke the service.
        st = await describe(nats_url, "sample")
        assert st.pods == [] and st.desired_pods == 0


async def test_full_buffer_answers_503_with_retry_after_and_loses_nothing(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    spec = sample_spec(env={"SAMPLE_STARTUP_DELAY_MS": "1500"})
    async with running_stack(nats_url, redis_url, tmp_path, buffer_size=3) as stack:
        await deploy(nats_url, spec)
        async with aiohttp.ClientSession() as http:

            async def one() -> tuple[int, str | None, dict]:
                async with http.post(f"{stack.url}/v2/models/sample/infer",
                                     json=v2_body()) as r:
                    return r.status, r.headers.get("Retry-After"), await r.json()

            results = await asyncio.gather(*(one() for _ in range(8)))
        ok = [r for r in results if r[0] == 200]
        full = [r for r in results if r[0] == 503]
        assert len(ok) == 3 and len(full) == 5, [r[0] for r in results]
        assert all(retry == "1" and "full" in body["error"] for _, retry, body in full)


async def test_pod_that_fails_to_start_gives_a_clear_5xx_not_a_hang(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    spec = sample_spec("broken", env={"SAMPLE_FAIL_ON_START": "1"})
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(15):
                async with http.post(f"{stack.url}/v2/models/broken/infer",
                                     json=v2_body()) as r:
                    assert r.status == 503
                    err = (await r.json())["error"]
        assert "failed to start" in err and "exited with code" in err
        st = await describe(nats_url, "broken")
        assert "exited with code" in st.last_error


async def test_invalid_spec_is_refused_with_a_clear_error(nats_url: str, redis_url: str,
                                                          tmp_path: Path) -> None:
    async with running_stack(nats_url, redis_url, tmp_path):
        bad = sample_spec(scaling=ScalingSpec(min_scale=3, max_scale=1))
        async with admin(nats_url) as bus:
            with pytest.raises(RemoteError) as err:
                await bus.call(ep.ADMIN_DEPLOY, DeployRequest(spec=bad), timeout=5)
        assert err.value.code == ErrorCode.INVALID
        assert "min-scale 3 > max-scale 1" in err.value.message
