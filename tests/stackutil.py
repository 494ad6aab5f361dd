"""Helpers for tests that run the whole embedded stack against the session's real
nats-server and Redis: build a stack, deploy through the admin API, poll with a deadline."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import aiohttp

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import ActivatorConfig, Config, NodesConfig, ScaleConfig
from kernel.identity import Login
from kernel.messages import (
    DeployRequest,
    NameRequest,
    Resources,
    ScalingSpec,
    ServiceSpec,
    ServiceStatus,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = [sys.executable, "-m", "examples.sample.server"]
T = TypeVar("T")


def sample_spec(name: str = "sample", **overrides: object) -> ServiceSpec:
    scaling = overrides.pop("scaling", None) or ScalingSpec(
        min_scale=0, stable_window_s=6.0, scale_to_zero_grace_s=1.0
    )
    base = ServiceSpec(
        name=name,
        command=list(SAMPLE),
        resources=Resources(cpu=0.5, memory_mb=128),
        scaling=scaling,  # type: ignore[arg-type]
    )
    return replace_struct(base, **overrides)


def replace_struct(spec: ServiceSpec, **changes: object) -> ServiceSpec:
    import msgspec

    return msgspec.structs.replace(spec, **changes)


def stack_config(state_dir: Path, **activator: object) -> Config:
    return Config(
        state_dir=state_dir,
        activator=replace(ActivatorConfig(port=0, metrics_interval_s=0.2), **activator),
        scale=ScaleConfig(tick_s=0.2),
        nodes=NodesConfig(count=2, capacity=Resources(cpu=4, memory_mb=4096), workdir=REPO),
    )


@asynccontextmanager
async def running_stack(
    nats_url: str, redis_url: str, state_dir: Path, **activator: object
) -> AsyncIterator[Stack]:
    stack = Stack(stack_config(state_dir, **activator), nats_url=nats_url, redis_url=redis_url)
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


@asynccontextmanager
async def admin(nats_url: str, login: Login | None = None,
                tls: ssl.SSLContext | None = None) -> AsyncIterator[Bus]:
    bus = await Bus.connect(nats_url, "test-admin", login=login, tls=tls)
    try:
        yield bus
    finally:
        await bus.close()


async def deploy(nats_url: str, spec: ServiceSpec, login: Login | None = None,
                 tls: ssl.SSLContext | None = None) -> ServiceStatus:
    async with admin(nats_url, login, tls) as bus:
        reply = await bus.call(ep.ADMIN_DEPLOY, DeployRequest(spec=spec), timeout=5)
    assert isinstance(reply, ServiceStatus)
    return reply


async def describe(nats_url: str, name: str) -> ServiceStatus:
    async with admin(nats_url) as bus:
        reply = await bus.call(ep.ADMIN_DESCRIBE, NameRequest(name=name), timeout=5)
    assert isinstance(reply, ServiceStatus)
    return reply


async def wait_until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, timeout: float, what: str
) -> T:
    deadline = time.monotonic() + timeout
    value = await probe()
    while not ok(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value}")
        await asyncio.sleep(0.1)
        value = await probe()
    return value


async def post_status(http: aiohttp.ClientSession, url: str, **body: object) -> int | str:
    """The answer's status, or the client error's name: a lost request shows as the latter."""
    try:
        async with http.post(url, **body) as r:  # type: ignore[arg-type]
            await r.read()
            return r.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__
