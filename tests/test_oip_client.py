"""The gateway as an Open Inference Protocol server, seen by an official client: Triton's
HTTP client (tritonclient, from PyPI), with and without a pinned model version, gets server
and model metadata, readiness and an inference from services at zero pods. JSON tensors
only (`binary_data=False`): the gateway does not implement Triton's binary extension.

And every error the gateway itself writes — an unknown route, a wrong method, a bad body, a
body over the limit, a request aiohttp cannot parse, an unknown model or version, a service
that cannot start — is KServe's `{"error": "..."}` in JSON with its status."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from activator.handler import check_shape
from tests.stackutil import deploy, describe, running_stack, sample_spec

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def session(url: str) -> dict[str, Any]:
    """One client's conversation (synchronous: tritonclient runs on gevent), pinned to
    `version` or not, for each service; what it saw, for the test to judge."""
    client = triton.InferenceServerClient(url=url.removeprefix("http://"),
                                          connection_timeout=60.0, network_timeout=60.0)
    seen: dict[str, Any] = {"live": client.is_server_live(),
                            "ready": client.is_server_ready(),
                            "server": client.get_server_metadata()}
    try:
        for name, version in (("oip-any", ""), ("oip-pinned", "7")):
            tensor = triton.InferInput("input-0", list(ROWS.shape), "FP32")
            tensor.set_data_from_numpy(ROWS, binary_data=False)
            result = client.infer(
                name, [tensor], model_version=version, request_id="r1",
                outputs=[triton.InferRequestedOutput("output-0", binary_data=False)])
            seen[name] = {
                # Inference first: the service is at zero, the first request wakes it.
                "infer": result.get_response(),
                "probs": result.as_numpy("output-0"),
                "metadata": client.get_model_metadata(name, model_version=version),
                "ready": client.is_model_ready(name, model_version=version),
            }
        seen["wrong-version-ready"] = client.is_model_ready("oip-pinned", model_version="1")
        try:
            client.get_model_metadata("oip-pinned", model_version="1")
        except InferenceServerException as exc:
            seen["wrong-version-metadata"] = (exc.status(), exc.message())
    finally:
        client.close()
    return seen


async def test_tritons_http_client_reaches_services_at_zero_with_and_without_a_version(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec(name="oip-any"))
        await deploy(nats_url, sample_spec(name="oip-pinned", model_version="7"))
        assert (await describe(nats_url, "oip-pinned")).desired_pods == 0
        seen = await asyncio.to_thread(session, stack.url)

    assert seen["live"] and seen["ready"]
    assert seen["server"]["name"] == "fnplane"
    for name, version in (("oip-any", "1"), ("oip-pinned", "7")):
        got = seen[name]
        assert got["ready"] is True
        assert got["metadata"]["name"] == name and got["metadata"]["versions"] == [version]
        assert got["metadata"]["inputs"][0]["name"] == "input-0"
        assert got["infer"]["model_name"] == name and got["infer"]["id"] == "r1"
        assert got["infer"]["model_version"] == version
        probs = got["probs"]
        assert probs.shape == (2, 3) and probs.dtype == np.float32
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The pinned service serves version 7 only: version 1 of it is unknown, in KServe's words.
    assert seen["wrong-version-ready"] is False
    status, message = seen["wrong-version-metadata"]
    assert status == "404" and "version 1 does not exist" in message


async def fetch(http: aiohttp.ClientSession, method: str, url: str,
                **kwargs: Any) -> tuple[int, str, Any]:
    async with http.request(method, url, **kwargs) as r:
        return r.status, r.content_type, json.loads(await r.read())


async def raw(url: str, request: bytes) -> tuple[int, str, Any]:
    """Bytes no HTTP client would send; the gateway's answer, read to the close."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers["content-type"].split(";")[0], json.loads(body)


async def test_every_error_the_gateway_writes_is_json_in_kserves_shape(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    limit = 64 * 1024
    bad_datatype = {"inputs": [{"name": "", "shape": [], "datatype": {}, "data": []}]}
    async with running_stack(nats_url, redis_url, tmp_path, max_body_bytes=limit) as stack:
        await deploy(nats_url, sample_spec(name="errs"))
        await deploy(nats_url, sample_spec(name="broken", env={"SAMPLE_FAIL_ON_START": "1"}))
        url = stack.url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            answers = {
                "unknown route": await fetch(http, "GET", f"{url}/v3/nothing"),
                "unparsable request": await raw(url, b"GET /v2 HTTP/1.1\r\nHost: x\r\n"
                                                     b"Bad Header Line\r\n\r\n"),
                "unparsable length": await raw(url, b"POST /v2/models/errs/infer HTTP/1.1\r\n"
                                                    b"Host: x\r\nContent-Length: abc\r\n\r\n"),
                "unknown route under v2": await fetch(http, "GET", f"{url}/v2/models/errs/x/y"),
                "wrong method": await fetch(http, "GET", f"{url}/v2/models/errs/infer"),
                "wrong method, versioned": await fetch(
                    http, "DELETE", f"{url}/v2/models/errs/versions/1/infer"),
                "not JSON": await fetch(http, "POST", f"{url}/v2/models/errs/infer",
                                        data=b"{nope"),
                "datatype an object": await fetch(http, "POST", f"{url}/v2/models/errs/infer",
                                                  json=bad_datatype),
                "v1 without instances": await fetch(
                    http, "POST", f"{url}/v1/models/errs:predict", json={"rows": []}),
                "too large": await fetch(http, "POST", f"{url}/v2/models/errs/infer",
                                         data=b" " * (limit + 1)),
                "unknown model": await fetch(http, "GET", f"{url}/v2/models/nobody/ready"),
                "unknown version": await fetch(
                    http, "POST", f"{url}/v2/models/errs/versions/2/infer", json=bad_datatype),
                "cannot start": await fetch(http, "POST", f"{url}/v2/models/broken/infer",
                                            json={"inputs": [{"name": "input-0",
                                                              "shape": [1, 4],
                                                              "datatype": "FP32",
                                                              "data": [1, 2, 3, 4]}]}),
            }
        woken = (await describe(nats_url, "errs")).desired_pods

    statuses = {what: status for what, (status, _ct, _body) in answers.items()}
    assert statuses == {
        "unknown route": 404, "unparsable request": 400, "unparsable length": 400,
        "unknown route under v2": 404, "wrong method": 405,
        "wrong method, versioned": 405, "not JSON": 400, "datatype an object": 400,
        "v1 without instances": 400, "too large": 413, "unknown model": 404,
        "unknown version": 404, "cannot start": 503,
    }
    for what, (_status, content_type, body) in answers.items():
        assert content_type == "application/json", what
        assert list(body) == ["error"] and isinstance(body["error"], str), (what, body)
    assert "datatype" in answers["datatype an object"][2]["error"]
    assert "version 2 does not exist" in answers["unknown version"][2]["error"]
    assert woken == 0, "no error above may wake the service"


@pytest.mark.parametrize(("body", "reason"), [
    ({"inputs": [{"name": "", "shape": [], "datatype": {}, "data": []}]}, "datatype"),
    ({"inputs": [{"name": 3, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
     "name"),
    ({"inputs": [{"name": "x", "shape": ["1"], "datatype": "FP32", "data": [1]}]}, "shape"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": 1}]}, "data"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, "data"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1],
                  "parameters": []}]}, "parameters"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
      "outputs": [{"name": {}}]}, "name"),
])
def test_the_gateways_body_check_names_the_bad_field(body: dict[str, Any], reason: str) -> None:
    problem = check_shape("v2", json.dumps(body).encode())

    assert problem is not None and reason in problem, problem
