"""The container entry point (`python -m controlplane.component`): every component the
Deployments in deploy/ name is built from the environment alone, and the exec probe tells
a running component from a stopped or wedged one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from controlplane import component
from kernel.component import Component
from tests.deployutil import build

ENV = {"FNPLANE_NATS_URL": "nats://nats:4222", "FNPLANE_REDIS_URL": "redis://redis:6379/0",
       "FNPLANE_NAMESPACE": "fnplane", "FNPLANE_POD_IMAGE": "fnplane:dev",
       "FNPLANE_POD_PULL_POLICY": "Never", "HOSTNAME": "fnplane-schedule-abc"}


@pytest.mark.parametrize("name", component.COMPONENTS)
async def test_every_component_is_built_from_the_environment(name: str, nats_url: str) -> None:
    built = await component.build(name, {**ENV, "FNPLANE_NATS_URL": nats_url})
    await built.stop()  # never started: stopping only closes its connection
    assert isinstance(built, Component) and not built.tasks


def test_the_deployments_name_only_known_components() -> None:
    args = {d["spec"]["template"]["spec"]["containers"][0]["args"][0]
            for d in build("base") if d["kind"] == "Deployment"}
    assert args == set(component.COMPONENTS)


async def test_node_component_takes_the_pod_image_and_pull_policy(nats_url: str) -> None:
    node = await component.build("node", {**ENV, "FNPLANE_NATS_URL": nats_url})
    await node.stop()
    assert node.config.image == "fnplane:dev" and node.config.image_pull_policy == "Never"
    assert node.config.namespace == "fnplane"


def test_probe_fails_before_start_and_after_a_stale_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alive = tmp_path / "alive"
    monkeypatch.setenv("FNPLANE_ALIVE_FILE", str(alive))
    assert component.probe() == 1
    alive.touch()
    assert component.probe() == 0
    old = time.time() - component.ALIVE_MAX_AGE_S - 5
    os.utime(alive, (old, old))
    assert component.probe() == 1
