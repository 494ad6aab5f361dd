"""What a local pod gets, on the embedded stack with real pods: a clean environment — the
spec's env, PORT and fnplane's own variables, but nothing of the control plane's (a secret in
the operator's shell must not show up inside a model server)."""

from __future__ import annotations

import sys
from pathlib import Path

import aiohttp
import pytest

from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.messages import (
    Empty,
    NameRequest,
    NodeInfo,
    NodeRegistration,
    Resources,
    ServiceSpec,
    StartPod,
    StopPod,
)
from kernel.procs import alive
from partitions.agents.local import LocalNode
from tests.stackutil import admin, deploy, running_stack, sample_spec, wait_until

BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}


async def test_a_pod_sees_none_of_the_control_planes_environment(
    nats_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("FNPLANE_CREDS", "/somewhere/credentials.json")
    dump = tmp_path / "pod-env.txt"
    # The pod writes what it sees, then serves as the sample does.
    command = ["sh", "-c", f'env > "{dump}"; exec "{sys.executable}" -m examples.sample.server']
    spec = sample_spec(name="env-check", command=command, env={"MODEL_NAME": "env-check",
                                                               "GREETING": "hello"})
    async with running_stack(nats_url, redis_url, tmp_path / "state") as stack:
        await deploy(nats_url, spec)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/env-check/infer", json=BODY) as r:
                status = r.status
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)

    assert status == 200
    assert "AWS_SECRET_ACCESS_KEY" not in seen and "FNPLANE_CREDS" not in seen
    assert seen["GREETING"] == "hello" and seen["PORT"].isdigit()
    assert seen["FNPLANE_SERVICE"] == "env-check"


async def test_nothing_a_pod_started_survives_its_delete(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    command = ["sh", "-c", f'sleep 300 & echo $! > "{pidfile}"; '
               f'exec "{sys.executable}" -m examples.sample.server']
    spec = sample_spec(name="orphans", command=command, env={"MODEL_NAME": "orphans"})
    async with running_stack(nats_url, redis_url, tmp_path / "state") as stack:
        await deploy(nats_url, spec)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/orphans/infer", json=BODY) as r:
                assert r.status == 200
        grandchild = int(pidfile.read_text())
        assert alive(grandchild)
        async with admin(nats_url) as bus:
            await bus.call(ep.ADMIN_DELETE, NameRequest(name="orphans"), timeout=5)
        await wait_until(lambda: _ready(not alive(grandchild)), lambda gone: gone, timeout=15,
                         what="the pod's child gone after delete")


async def _ready(value: bool) -> bool:
    return value


async def test_a_node_keeps_the_logs_of_its_newest_ended_pods_only(
    nats_url: str, tmp_path: Path
) -> None:
    """Pod logs do not pile up for ever: a node keeps those of its `keep_logs` newest ended
    pods (for `describe` and debugging) and removes older ones."""
    logs = tmp_path / "pods"
    node = LocalNode(await Bus.connect(nats_url, "node-logs"),
                     NodeInfo(name="logs-n0", capacity=Resources(cpu=4, memory_mb=4096)),
                     workdir=tmp_path, log_dir=logs, keep_logs=2)
    spec = ServiceSpec(name="chatty", command=["sh", "-c", "echo hello; sleep 30"],
                       resources=Resources(cpu=0.1, memory_mb=16))
    caller = await Bus.connect(nats_url, "test-logs")

    async def registered(_msg: NodeRegistration, _raw: object) -> Empty:
        return Empty()  # as the coordinator answers a node agent's registration

    try:
        await caller.serve(ep.NODE_REGISTER, registered)
        async with node:
            for i in range(4):
                start = StartPod(pod=f"chatty-{i}", spec=spec, node="logs-n0", requested_at=0,
                                 placed_at=0, partition=0, epoch=1)
                await caller.call(ep.NODE_START, start, node="logs-n0", timeout=10)
                await caller.call(ep.NODE_STOP, StopPod(pod=f"chatty-{i}", service="chatty"),
                                  node="logs-n0", timeout=20)
    finally:
        await caller.close()

    assert sorted(p.name for p in logs.iterdir()) == ["chatty-2.log", "chatty-3.log"]
