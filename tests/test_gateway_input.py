"""Hostile input at the gateway gets KServe's error shape, never a bare 500 page, and wakes
nothing: a body nested a hundred thousand levels deep, a body that lies about its
Content-Encoding. A body sent without Content-Type reaches the pod as JSON (aiohttp would say
application/octet-stream, which FastAPI-based model servers refuse with a 422)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from activator.proxy import PodUnreachable, Proxy
from tests.stackutil import deploy, describe, running_stack, sample_spec


async def test_hostile_bodies_are_400s_in_kserves_shape_and_wake_nothing(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec(name="hostile"))
        url = f"{stack.url}/v2/models/hostile/infer"
        answers = []
        connector = aiohttp.TCPConnector(force_close=True)  # a broken body ends its connection
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
            for body, headers in [
                (b"[" * 100_000, {"Content-Type": "application/json"}),
                (b'{"inputs": [1]}', {"Content-Type": "application/json",
                                      "Content-Encoding": "gzip"}),
                (b"\xff\xfe not json", {}),
            ]:
                async with http.post(url, data=body, headers=headers) as r:
                    answers.append((r.status, r.content_type, await r.json()))
        status = await describe(nats_url, "hostile")

    assert [a[0] for a in answers] == [400, 400, 400], answers
    assert all(ct == "application/json" and a["error"] for _s, ct, a in answers), answers
    assert status.desired_pods == 0 and not status.pods, "bad input must not wake the service"


async def test_a_body_without_content_type_reaches_the_pod_as_json() -> None:
    seen: list[str] = []

    async def infer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Content-Type", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v2/models/m/infer", infer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    proxy = Proxy(timeout_s=5)
    await proxy.start()
    try:
        sent_bare = await proxy.forward(f"http://127.0.0.1:{port}", "POST", "/v2/models/m/infer",
                                        b'{"inputs": []}', {})
        sent_own = await proxy.forward(f"http://127.0.0.1:{port}", "POST", "/v2/models/m/infer",
                                       b'{"inputs": []}', {"Content-Type": "application/x-mine"})
    finally:
        await proxy.close()
        await runner.cleanup()

    assert (sent_bare.status, sent_own.status) == (200, 200)
    assert seen == ["application/json", "application/x-mine"]


async def test_a_connect_timeout_is_a_pod_unreachable_not_a_504() -> None:
    """A pod whose accept queue is full never gets the request: the proxy says so (the
    handler then retries on another pod) instead of answering 504 "did not answer"."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    proxy = Proxy(timeout_s=30, connect_timeout_s=0.5)
    await proxy.start()
    try:
        with pytest.raises(PodUnreachable):
            await proxy.forward(f"http://127.0.0.1:{port}", "POST", "/v2/models/m/infer",
                                b"{}", {})
    finally:
        await proxy.close()
        for s in fillers:
            s.close()
        listener.close()
