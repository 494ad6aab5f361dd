"""`fnplane up` runs one process per role — the coordinator (with the control-function
instances it starts), the node agents, each gateway worker — and restarts any that dies.
Tested as a user runs it (a foreground `fnplane up`, the CLI as separate processes): a gateway
worker SIGKILLed mid-burst leaves the other serving, and the only requests without an answer
are ones the killed worker held (a connection error, never a 5xx or a hang); with two workers
no pod ever exceeds its container concurrency; every role process killed is restarted and the
stack serves a cold request 10 s later; Ctrl-C leaves no process behind. The split of a pod's
capacity among workers is checked as a table with no network."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from activator.workers import Worker
from kernel.procs import alive, descendants
from loadtests.faults import role_pids
from tests.stackutil import REPO, post_status
from tests.test_fnplane_up import Up

BODY = (REPO / "examples/sample/request_v2.json").read_bytes()


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 10, 64])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_workers_parts_of_a_pod_add_up_to_its_limit(capacity: int, workers: int) -> None:
    for pod in ("a", "b", "sample-12ab34cd", "x" * 40):
        parts = [Worker(i, workers).share(capacity, pod) for i in range(workers)]
        assert sum(parts) == capacity, (pod, parts)
        assert max(parts) - min(parts) <= 1, (pod, parts)
    assert Worker(0, workers).share(0, "a") == 0, "unlimited stays unlimited"
    assert Worker(1 % workers, workers).buffer(1000) * workers <= 1000


def _role_pids(up: Up) -> dict[str, int]:
    return role_pids(up.proc.pid)


async def _post(http: aiohttp.ClientSession, url: str) -> int | str:
    return await post_status(http, url, data=BODY)


async def _wait_roles(up: Up, want: set[str], old: dict[str, int],
                      timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _role_pids(up)
        if want <= set(now) and all(now[r] != old.get(r) for r in want if r in old):
            return now
        await asyncio.sleep(0.2)
    raise AssertionError(f"roles not restarted: {_role_pids(up)} (killed {old})")


async def test_a_killed_gateway_worker_leaves_the_other_serving_within_pod_limits(
    tmp_path: Path,
) -> None:
    up = Up(tmp_path / "state", extra=["--gateway-workers", "2"])
    family: set[int] = set()
    try:
        out = up.cli("deploy", "sample", "--concurrency-limit", "2", "--scale-max", "4",
                     "--env", "SAMPLE_LATENCY_MS=100", "--scale-window", "6s")
        assert out.returncode == 0, out.stderr
        roles = _role_pids(up)
        assert {"coordinator", "nodes", "activator-0", "activator-1"} <= set(roles), roles
        url = f"http://127.0.0.1:{up.port}/v2/models/sample/infer"
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            tasks = [asyncio.create_task(_post(http, url)) for _ in range(200)]
            await asyncio.sleep(1.5)  # pods are up and the burst is spread over both workers
            os.kill(roles["activator-0"], signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            after = [await _post(http, url) for _ in range(10)]
            # Every pod's own count of requests at once: never above its limit of 2.
            desc = json.loads(up.cli("describe", "sample", "--json").stdout)
            peaks = []
            for pod in desc["pods"]:
                async with http.get(pod["url"] + "/stats") as r:
                    peaks.append((await r.json())["max_in_flight"])
        outcome = collections.Counter(results)
        failed = {k: v for k, v in outcome.items() if k != 200}
        assert all(isinstance(k, str) for k in failed), f"only connection errors: {outcome}"
        # Only what the killed worker held: at most the client's connections to it.
        assert sum(failed.values()) <= 100, outcome
        assert outcome[200] >= 100, outcome
        assert after == [200] * 10, "the other worker serves, the killed one comes back"
        assert peaks and max(peaks) <= 2, peaks
        family = descendants(up.proc.pid)
    finally:
        assert up.interrupt() == 0
    await asyncio.sleep(0.2)
    assert [p for p in family if alive(p)] == [], "processes left behind after Ctrl-C"


async def test_every_role_process_killed_is_restarted_and_serves_10s_later(
    tmp_path: Path,
) -> None:
    up = Up(tmp_path / "state")
    try:
        assert up.cli("deploy", "first", "--scale-window", "6s").returncode == 0
        before = _role_pids(up)
        assert {"coordinator", "nodes", "activator-0"} <= set(before), before
        for pid in before.values():
            os.kill(pid, signal.SIGKILL)
        await _wait_roles(up, {"coordinator", "nodes", "activator-0"}, before, timeout=30)
        await asyncio.sleep(10)
        out = up.cli("deploy", "second", "--scale-window", "6s")
        assert out.returncode == 0, out.stderr
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for service in ("first", "second"):
                url = f"http://127.0.0.1:{up.port}/v2/models/{service}/infer"
                assert await _post(http, url) == 200, service
    finally:
        assert up.interrupt() == 0


def test_the_direct_path_takes_unlimited_pods_and_only_its_share_of_limited_ones() -> None:
    """A pod without a container-concurrency limit stays unlimited for every worker (a
    share of 0 there once sent every direct request back through the activator)."""
    from activator.direct import DirectPath
    from kernel.messages import Endpoint

    free = [Endpoint(pod="a", url="http://127.0.0.1:1", node="n", container_concurrency=0)]
    assert DirectPath(worker=Worker(1, 2)).try_acquire("s", free, 0) is not None
    one = [Endpoint(pod="b", url="http://127.0.0.1:2", node="n", container_concurrency=1)]
    takers = [DirectPath(worker=Worker(i, 2)).try_acquire("s", one, 0) for i in range(2)]
    assert sum(t is not None for t in takers) == 1, "one slot, one worker"
