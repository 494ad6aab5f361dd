"""A real third-party model server as a pod: KServe's own Python server (FastAPI, from PyPI)
with a tiny model (examples/kserve_model/), deployed through fnplane like the sample and
reached through the gateway from zero, by KServe v1 predict and OIP v2 infer.

With and without a Content-Type: FastAPI-based servers read a body by its Content-Type
(KServe takes application/octet-stream for binary tensors and refuses JSON sent so), so the
gateway forwards the client's Content-Type and says application/json when the client gave
none (aiohttp would otherwise say application/octet-stream).

And on OIP's versioned paths: KServe's server declares them but answers 501 "Model versioning
not supported yet", so the gateway (which checked the version itself) falls back to the
unversioned path for that service, and goes there at once from then on."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import aiohttp

from kernel.messages import Resources, ScalingSpec, ServiceSpec
from tests.stackutil import deploy, running_stack

V1 = {"instances": [[1, 2, 3], [4, 5, 6]]}
V2 = {"id": "r1", "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                              "data": [1, 2, 3, 4, 5, 6]}]}


def kserve_spec(name: str) -> ServiceSpec:
    return ServiceSpec(
        name=name, command=[sys.executable, "-m", "examples.kserve_model"],
        resources=Resources(cpu=0.5, memory_mb=256), startup_timeout_s=60.0,
        scaling=ScalingSpec(min_scale=0, stable_window_s=6.0, scale_to_zero_grace_s=30.0),
    )


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, object],
               content_type: str | None) -> tuple[int, dict[str, object]]:
    """`content_type=None` sends no Content-Type header at all."""
    headers = {"Content-Type": content_type} if content_type else {}
    async with http.post(url, data=json.dumps(body).encode(), headers=headers,
                         skip_auto_headers=() if content_type else ("Content-Type",),
                         timeout=aiohttp.ClientTimeout(total=90)) as r:
        return r.status, await r.json(content_type=None)


async def test_kserve_model_server_serves_v1_and_v2_through_the_gateway_from_zero(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    assert importlib.util.find_spec("kserve"), "kserve is missing: run scripts/bootstrap.sh"
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        # One service per way of sending, so each one's first request is a cold start.
        ways = {"adder-bare": None, "adder-json": "application/json"}
        for name in ways:
            await deploy(nats_url, kserve_spec(name))
        async with aiohttp.ClientSession() as http:

            async def both(name: str, content_type: str | None) -> list[object]:
                v2 = await post(http, f"{stack.url}/v2/models/{name}/infer", V2, content_type)
                v1 = await post(http, f"{stack.url}/v1/models/{name}:predict", V1,
                                content_type)
                return [v2, v1]

            answers = dict(zip(ways, await asyncio.gather(
                *(both(n, ct) for n, ct in ways.items())), strict=True))
            pinned = f"{stack.url}/v2/models/adder-json/versions/1"
            versioned = [await post(http, f"{pinned}/infer", V2, "application/json")
                         for _ in range(2)]
            async with http.get(pinned) as r:
                metadata = (r.status, await r.json())

    for name, (v2, v1) in answers.items():
        assert v2[0] == 200, (name, v2)
        assert v2[1]["model_name"] == name and v2[1]["id"] == "r1", (name, v2)
        assert v2[1]["outputs"] == [{"name": "sum", "shape": [2], "datatype": "FP64",
                                     "parameters": None, "data": [6.0, 15.0]}], (name, v2)
        assert v1 == (200, {"predictions": [6.0, 15.0]}), (name, v1)
    assert [v for v, _ in versioned] == [200, 200], versioned
    assert all(a["outputs"][0]["data"] == [6.0, 15.0] for _, a in versioned), versioned
    assert metadata[0] == 200 and metadata[1]["name"] == "adder-json", metadata
