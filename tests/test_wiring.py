"""One wiring path: every component is built from one `Config` (controlplane/build.py),
owns the connected bus it is handed, runs as an async context manager that leaves no task
and no connection behind, and an instance in its own process gets the parent's whole
Config, so `--runtime processes` honours every setting."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from nats.aio.msg import Msg

from controlplane import build
from controlplane.instance import READY_LINE
from controlplane.runtime import ProcessRuntime
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import (
    ActivatorConfig,
    Config,
    ConfigError,
    CoordinatorConfig,
    ScaleConfig,
    ScheduleConfig,
    dumps,
    loads,
)
from kernel.messages import Empty, ServiceList


def non_default(nats_url: str = "nats://127.0.0.1:4222", redis_url: str = "redis://x") -> Config:
    """A setting off its default in every section."""
    return Config(
        nats_url=nats_url,
        redis_url=redis_url,
        schedule=ScheduleConfig(probe_cache_ttl_s=3.5, max_probes=7, reserve_timeout_s=0.75,
                                sampling_d=3, sampling_max_tries=2, sampling_seed=11),
        scale=ScaleConfig(tick_s=0.3, place_timeout_s=4.0),
        activator=replace(ActivatorConfig(), buffer_size=77, request_timeout_s=12.0),
        coordinator=CoordinatorConfig(heartbeat_timeout_s=1.5, schedule_max=3),
    )


def test_a_config_round_trips_through_json_and_is_validated_on_the_way_in() -> None:
    config = non_default()

    assert loads(dumps(config)) == config
    with pytest.raises(ConfigError, match="probes >= 0"):
        loads(dumps(config).replace('"max_probes":7', '"max_probes":-1'))
    with pytest.raises(ConfigError):
        loads("{not json")


async def test_the_process_runtime_hands_an_instance_the_whole_config(
    nats_url: str, redis_url: str
) -> None:
    config = non_default(nats_url, redis_url)
    runtime = ProcessRuntime(config, kinds=["schedule"])
    try:
        await runtime.scale("schedule", 1)
        [proc] = runtime.running["schedule"].values()
        async with asyncio.timeout(30):
            assert await proc.wait_for_line(READY_LINE), proc.tail(30)
        line = next(x for x in proc.tail(50).splitlines() if READY_LINE in x)
    finally:
        await runtime.stop()

    assert loads(line.split("config=", 1)[1]) == config


@pytest.mark.parametrize("kind", sorted(build.INSTANCES))
async def test_every_instance_owns_its_bus_and_leaves_nothing_behind(
    kind: str, nats_url: str, redis_url: str
) -> None:
    config = non_default(nats_url, redis_url)
    component = await build.instance(kind, config, f"wiring-{kind}")
    registry = await Bus.connect(nats_url, "wiring-registry")  # `scale` asks it at start

    async def no_services(_msg: Empty, _raw: Msg) -> ServiceList:
        return ServiceList(services=[])

    try:
        await registry.serve(ep.ADMIN_LIST, no_services)
        async with component:
            running = component.tasks.names()
            assert component.id == component.bus.name == f"wiring-{kind}"
    finally:
        await registry.close()

    assert running, "its background work runs in its task group"
    assert len(component.tasks) == 0 and component.bus.nc.is_closed
