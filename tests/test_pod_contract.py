"""What a local pod gets, on the embedded stack with real pods: a clean environment — the
spec's env, PORT and fnplane's own variables, but nothing of the control plane's (a secret in
the operator's shell must not show up inside a model server)."""

from __future__ import annotations

import sys
from pathlib import Path

import aiohttp
import pytest

from kernel import endpoints as ep
from kernel.messages import NameRequest
from kernel.procs import alive
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
