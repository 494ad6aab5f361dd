"""A pod whose readiness flips after start-up (issue 14), on the `local` backend, through the
whole embedded stack against the real nats-server and Redis: the node agent keeps probing
each ready pod on the spec's period, an `unready` pod gets no request — through the
activator or sent direct — until it is ready again, and `scale` does not replace it for
having flapped. The pods are the sample model, switched unready by a file."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import aiohttp
import pytest

from kernel.messages import ScalingSpec, ServiceSpec, ServiceStatus
from tests.stackutil import deploy, describe, running_stack, sample_spec, wait_until
from tests.test_scale_from_zero import v2_body

Served = collections.Counter[tuple[str, str]]  # (pod, path) → requests answered


async def burst(url: str, n: int = 16, service: str = "sample") -> Served:
    """`n` requests at once; which pod answered each, and by which path. Every one must be
    answered: a pod withdrawn is never a failed request."""
    async def one(http: aiohttp.ClientSession) -> tuple[str, str]:
        async with http.post(f"{url}/v2/models/{service}/infer", json=v2_body()) as r:
            body = await r.read()
            assert r.status == 200, body
            return r.headers["X-Fnplane-Pod"], r.headers["X-Fnplane-Path"]

    async with aiohttp.ClientSession() as http:
        return collections.Counter(await asyncio.gather(*(one(http) for _ in range(n))))


def pods_of(served: Served) -> set[str]:
    return {pod for pod, _ in served}


def flapping_spec(flags: Path, *, direct: bool) -> ServiceSpec:
    """Two pods, always (min = max = 2); each unready while `flags/<pod>` exists, probed
    every 100 ms and withdrawn after two failures. Direct: target burst capacity 0, so
    gateways send straight to pods as soon as one is ready; else the activator stays in
    the path (-1)."""
    return sample_spec(
        scaling=ScalingSpec(min_scale=2, max_scale=2, initial_scale=2, stable_window_s=6.0,
                            scale_to_zero_grace_s=1.0,
                            target_burst_capacity=0.0 if direct else -1.0),
        env={"SAMPLE_UNREADY_FILE": str(flags / "{pod}"), "SAMPLE_LATENCY_MS": "30"},
        readiness_period_s=0.1, readiness_failure_threshold=2,
    )


def state_of(st: ServiceStatus, pod: str) -> str:
    return next((p.state for p in st.pods if p.pod == pod), "absent")


@pytest.mark.parametrize("direct", [False, True], ids=["through-activator", "direct"])
async def test_a_pod_whose_readiness_flips_gets_no_requests_until_ready_again(
    nats_url: str, redis_url: str, tmp_path: Path, direct: bool
) -> None:
    flags = tmp_path / "unready"
    flags.mkdir()
    path = "direct" if direct else "activator"
    async with running_stack(nats_url, redis_url, tmp_path / "state") as stack:
        await deploy(nats_url, flapping_spec(flags, direct=direct))
        st = await wait_until(lambda: describe(nats_url, "sample"),
                              lambda s: s.ready_pods == 2, timeout=30, what="two ready pods")
        a, b = sorted(p.pod for p in st.pods)
        # Both serve, by the path under test (the mode switch follows the pods' readiness).
        await wait_until(lambda: burst(stack.url),
                         lambda s: pods_of(s) == {a, b} and {p for _, p in s} == {path},
                         timeout=15, what=f"both pods serving by the {path} path")

        (flags / a).touch()
        st = await wait_until(lambda: describe(nats_url, "sample"),
                              lambda s: state_of(s, a) == "unready", timeout=10,
                              what=f"{a} reported unready")
        await asyncio.sleep(0.3)  # the endpoint set on its way from route to the activator
        for _ in range(3):
            served = await burst(stack.url)
            assert pods_of(served) == {b}, f"{a} got requests while unready: {served}"
        # Still counted, not replaced: the same two pods, one of them unready.
        st = await describe(nats_url, "sample")
        assert sorted(p.pod for p in st.pods) == [a, b]
        assert (state_of(st, a), state_of(st, b), st.ready_pods) == ("unready", "ready", 1)

        (flags / a).unlink()
        await wait_until(lambda: burst(stack.url), lambda s: a in pods_of(s), timeout=10,
                         what=f"{a} serving again")
        st = await describe(nats_url, "sample")
        assert sorted(p.pod for p in st.pods) == [a, b] and st.ready_pods == 2
