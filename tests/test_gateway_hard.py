"""A hard gateway: a client that trickles its headers or stalls its body is cut and holds no
connection slot; connections beyond the cap are refused at once while existing clients are
served and the process's descriptors stay bounded; bodies beyond the in-flight byte budget
get 503 with Retry-After; SIGTERM to `fnplane up` turns readiness false, answers what is in
flight, then exits 0. Every refusal is in KServe's error shape. Small limits, few sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import urllib3

from activator.ingress import BodyBudget
from activator.listener import connection_cap
from tests.stackutil import REPO, deploy, running_stack, sample_spec
from tests.test_fnplane_up import Up

V2_BODY = (REPO / "examples/sample/request_v2.json").read_bytes()


async def _connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _answer_then_eof(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """Everything the server sends until it closes: status, JSON body, raw head."""
    raw = await asyncio.wait_for(reader.read(), timeout=10)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head


@pytest.mark.parametrize(("configured", "open_files", "reserve", "cap"), [
    (4096, 20_000, 1024, 4096),  # the limit has room: as configured
    (4096, 4096, 1024, 1536),  # two descriptors per connection (client, pod) after the reserve
    (4096, 1024, 1024, 1),  # no room at all: still serves one, and the activator warns
])
def test_the_connection_cap_fits_the_open_files_budget(
    configured: int, open_files: int, reserve: int, cap: int
) -> None:
    assert connection_cap(configured, open_files, reserve) == cap


def test_a_body_lease_grows_within_the_budget_and_gives_everything_back() -> None:
    budget = BodyBudget(100)
    with budget.lease() as a, budget.lease() as b:
        assert a.grow_to(60) and a.grow_to(40)  # shrinking keeps what it holds
        assert not b.grow_to(41) and b.grow_to(40)
        assert budget.held == 100
    assert budget.held == 0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_trickling_client_is_cut_and_a_normal_request_is_served(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path, header_timeout_s=0.5,
                             body_timeout_s=0.5) as stack:
        guard = stack.activator.guard  # type: ignore[union-attr]
        # Slowloris: a request line, then one header byte now and then, never the blank line.
        r1, w1 = await _connect(stack.url)
        w1.write(b"POST /v2/models/any/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # A body that stops: complete headers, a tenth of the declared body, then silence.
        r2, w2 = await _connect(stack.url)
        w2.write(b"POST /v2/models/any/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b" " * 10)

        async def trickle() -> None:
            while not w1.is_closing():
                w1.write(b"a")
                await asyncio.sleep(0.1)

        trickling = asyncio.create_task(trickle())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{stack.url}/v2/health/live") as r:
                live = r.status
        slow_headers = await _answer_then_eof(r1)
        slow_body = await _answer_then_eof(r2)
        trickling.cancel()
        w1.close()
        w2.close()
        await asyncio.sleep(0.1)
        still_open = guard.open

    assert live == 200
    assert slow_headers[0] == 408 and "headers" in slow_headers[1]["error"], slow_headers
    assert slow_body[0] == 408 and "body" in slow_body[1]["error"], slow_body
    assert guard.cut >= 1
    assert still_open == 0, "a cut client must not keep its connection slot"


async def test_connections_beyond_the_cap_are_refused_and_descriptors_stay_bounded(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    cap, extra = 8, 40
    async with running_stack(nats_url, redis_url, tmp_path, max_connections=cap) as stack:
        guard = stack.activator.guard  # type: ignore[union-attr]
        assert guard.cap == cap
        async with aiohttp.ClientSession() as http:  # one kept-alive client, served throughout
            async with http.get(f"{stack.url}/v2/health/live") as r:
                assert r.status == 200
            idle = [await _connect(stack.url) for _ in range(cap - 1)]  # fill the other slots
            before = _open_fds()
            refused = [await _connect(stack.url) for _ in range(extra)]
            answers = await asyncio.gather(*(_answer_then_eof(r) for r, _ in refused))
            peak = _open_fds()  # our own `extra` client sockets are still open here
            async with http.get(f"{stack.url}/v2/health/live") as r:
                served_at_cap = r.status
            for _, w in idle + refused:
                w.close()
            await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as fresh:  # slots are free again
                async with fresh.get(f"{stack.url}/v2/health/live") as r:
                    served_after = r.status

    assert {a[0] for a in answers} == {503}, answers[:3]
    assert all(a[1]["error"] and b"Retry-After: 1" in a[2] for a in answers)
    assert guard.refused == extra
    assert served_at_cap == 200 and served_after == 200
    # Each refused connection lived one loop iteration on the server side: the process
    # holds our `extra` client ends, not twice as many.
    assert peak - before <= extra + 8, (before, peak)


async def test_bodies_beyond_the_in_flight_budget_get_503_while_a_small_request_is_served(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    mib = 1024 * 1024
    async with running_stack(nats_url, redis_url, tmp_path, max_body_bytes=mib,
                             max_body_bytes_in_flight=2 * mib + 64 * 1024) as stack:
        await deploy(nats_url, sample_spec(name="budget"))
        url = f"{stack.url}/v2/models/budget/infer"
        big = V2_BODY + b" " * (mib - len(V2_BODY))  # valid JSON, exactly 1 MiB
        head = (f"POST /v2/models/budget/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                f"application/json\r\nContent-Length: {mib}\r\nConnection: close\r\n\r\n"
                ).encode()
        # Two 1 MiB bodies in flight: their headers are in, their bodies still arriving.
        held = [await _connect(stack.url) for _ in range(2)]
        for _, w in held:
            w.write(head + big[:1000])
            await w.drain()
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=big,
                                 headers={"Content-Type": "application/json"}) as r:
                over = (r.status, r.headers.get("Retry-After"), await r.json())
            async with http.post(url, data=V2_BODY,
                                 headers={"Content-Type": "application/json"}) as r:
                small = r.status
        for _, w in held:
            w.write(big[1000:])
        finished = [await _answer_then_eof(r) for r, _ in held]
        for _, w in held:
            w.close()
        await asyncio.sleep(0.1)
        budget_left = stack.activator.bodies.held  # type: ignore[union-attr]

    assert over[0] == 503 and over[1] == "1" and over[2]["error"], over
    assert small == 200
    assert [f[0] for f in finished] == [200, 200], finished
    assert budget_left == 0, "every request gives its share of the budget back"


def test_sigterm_drains_fnplane_up(tmp_path: Path) -> None:
    up = Up(tmp_path / "state", extra=["--drain-grace", "1.5"])
    try:
        out = up.cli("deploy", "slow", "--min-scale", "1", "--env", "SAMPLE_LATENCY_MS=3000")
        assert out.returncode == 0, out.stderr
        url = f"http://127.0.0.1:{up.port}"
        http = urllib3.PoolManager(retries=False)
        statuses: list[int] = []

        def call() -> None:
            r = http.request("POST", f"{url}/v2/models/slow/infer", body=V2_BODY,
                             headers={"Content-Type": "application/json"}, timeout=30.0)
            statuses.append(r.status)

        callers = [threading.Thread(target=call) for _ in range(3)]
        for t in callers:
            t.start()
        time.sleep(0.5)  # let them reach the gateway (its grace would accept them anyway)
        up.proc.send_signal(signal.SIGTERM)
        # Readiness turns false at once, while the listener still accepts for the grace.
        readiness = []
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            r = http.request("GET", f"{url}/v2/health/ready", timeout=5.0)
            readiness.append((r.status, json.loads(r.data)))
            if r.status == 503:
                break
            time.sleep(0.02)
        for t in callers:
            t.join(timeout=30)
        code = up.proc.wait(timeout=60)
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()

    assert readiness[-1][0] == 503 and readiness[-1][1]["error"], readiness
    assert statuses == [200, 200, 200]
    assert code == 0
