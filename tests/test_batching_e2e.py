"""Micro-batching in the activator, end to end: requests to a service that declares a max
batch size and max wait arrive together, reach the pod as fewer, larger requests, and each
client still gets exactly its own rows' answers (checked against the model in-process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import nats
import numpy as np

from activator.nats_ingress import STATUS_HEADER
from examples.sample.model import load_model
from kernel import endpoints as ep
from kernel.messages import BatchingSpec, ScalingSpec
from tests.stackutil import deploy, running_stack, sample_spec

MODEL = load_model()


def row(i: int) -> list[float]:
    return [4.0 + (i % 7) * 0.5, 2.5 + (i % 3) * 0.3, 1.0 + (i % 5), 0.1 + (i % 4) * 0.5]


async def test_concurrent_requests_share_batches_and_get_their_own_answers(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    spec = sample_spec(
        container_concurrency=2,
        batching=BatchingSpec(max_batch_size=8, max_wait_ms=30),
        scaling=ScalingSpec(min_scale=1, max_scale=1, stable_window_s=6),
    )
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        url = stack.url
        async with aiohttp.ClientSession() as http:

            async def v2(i: int) -> tuple[int, list[float]]:
                body = {"id": f"r{i}", "inputs": [{"name": "input-0", "shape": [1, 4],
                                                  "datatype": "FP32", "data": row(i)}]}
                async with http.post(f"{url}/v2/models/sample/infer", json=body) as r:
                    answer = await r.json()
                    assert answer.get("id") == f"r{i}"
                    return r.status, answer["outputs"][0]["data"]

            async def v1(i: int) -> tuple[int, list[float]]:
                async with http.post(f"{url}/v1/models/sample:predict",
                                     json={"instances": [row(i)]}) as r:
                    return r.status, (await r.json())["predictions"][0]

            results = await asyncio.gather(*(v2(i) for i in range(40)),
                                           *(v1(i) for i in range(40, 64)))
        for i, (status, out) in enumerate(results):
            assert status == 200
            want = MODEL.predict(np.asarray([row(i)], dtype=np.float32))[0]
            assert np.allclose(out, want, atol=1e-5), (i, out, want)
        batcher = stack.activator.services["sample-00001"].batcher  # type: ignore[union-attr]
        assert batcher.rows_sent == 64
        assert batcher.batches_sent < 64, "requests that arrived together were batched"
        assert batcher.max_rows_in_a_batch <= 8


async def test_nats_invoke_batches_like_http(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """`svc.invoke` goes through the same request handler as HTTP, so it batches too."""
    spec = sample_spec(
        name="batch-nats",
        container_concurrency=2,
        batching=BatchingSpec(max_batch_size=8, max_wait_ms=30),
        scaling=ScalingSpec(min_scale=1, max_scale=1, stable_window_s=6),
    )
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        nc = await nats.connect(nats_url)
        try:

            async def one(i: int) -> tuple[str, str, list[float]]:
                body = {"id": f"n{i}", "inputs": [{"name": "input-0", "shape": [1, 4],
                                                  "datatype": "FP32", "data": row(i)}]}
                reply = await nc.request(ep.INVOKE.subject_for(service="batch-nats"),
                                         json.dumps(body).encode(), timeout=60)
                answer = json.loads(reply.data)
                assert answer.get("id") == f"n{i}", answer
                headers = reply.headers or {}
                return (headers.get(STATUS_HEADER, ""), headers.get("Fnplane-Path", ""),
                        answer["outputs"][0]["data"])

            results = await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await nc.close()
        for i, (status, path, out) in enumerate(results):
            assert (status, path) == ("200", "activator-batch")
            want = MODEL.predict(np.asarray([row(i)], dtype=np.float32))[0]
            assert np.allclose(out, want, atol=1e-5), (i, out, want)
        batcher = stack.activator.services["batch-nats-00001"].batcher  # type: ignore[union-attr]
        assert batcher.rows_sent == 32
        assert batcher.batches_sent < 32, "requests that arrived together were batched"
