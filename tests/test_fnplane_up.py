"""`fnplane up` as a user runs it: a foreground process that starts its own nats-server and
Redis, serves a cold request, keeps its services across a restart, and on SIGINT stops
leaving no process behind. The CLI commands run as separate processes against it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import urllib3

from examples.sample.model import load_model
from kernel.procs import alive, descendants, free_port
from tests.stackutil import REPO

FNPLANE = [sys.executable, "-m", "controlplane.cli"]


class Up:
    def __init__(self, state_dir: Path, *, extra: Sequence[str] = ()) -> None:
        self.port, self.nats_port = free_port(), free_port()
        self.grpc_port = free_port()  # not 8081: tests run beside other stacks
        # The CLI finds the admin credentials `up` made in the state dir.
        self.env = {**os.environ, "FNPLANE_NATS_URL": f"nats://127.0.0.1:{self.nats_port}",
                    "FNPLANE_STATE_DIR": str(state_dir)}
        self.proc = subprocess.Popen(
            [*FNPLANE, "up", "--port", str(self.port), "--nats-port", str(self.nats_port),
             "--grpc-port", str(self.grpc_port),
             "--state-dir", str(state_dir), "--workdir", str(REPO), *extra],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 90  # a loaded machine starts Python slowly
        self.banner: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.banner.append(line)
            if "Ctrl-C" in line:
                return
        self.proc.kill()
        raise AssertionError("fnplane up did not come up:\n" + "".join(self.banner))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FNPLANE, *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=60)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"


def test_up_serves_from_zero_keeps_services_and_stops_cleanly(state_dir: Path) -> None:
    up = Up(state_dir)
    try:
        assert f"grpc     127.0.0.1:{up.grpc_port}" in "".join(up.banner)
        out = up.cli("deploy", "sample", "--min-scale", "0", "--model-version", "4")
        assert out.returncode == 0, out.stderr
        assert f"http://127.0.0.1:{up.port}/v2/models/sample/infer" in out.stdout

        body = (REPO / "examples/sample/request_v2.json").read_bytes()
        http = urllib3.PoolManager()
        r = http.request("POST", f"http://127.0.0.1:{up.port}/v2/models/sample/infer",
                         body=body, timeout=30.0)
        assert r.status == 200, r.data
        req, got = json.loads(body), json.loads(r.data)
        rows = np.asarray(req["inputs"][0]["data"], dtype=np.float32).reshape(-1, 4)
        out0 = got["outputs"][0]
        assert np.allclose(np.asarray(out0["data"]).reshape(out0["shape"]),
                           load_model().predict(rows), atol=1e-6)

        listing = up.cli("list")
        assert listing.returncode == 0 and "sample" in listing.stdout
        desc = up.cli("describe", "sample")
        assert "Last cold start" in desc.stdout and "process_spawned->ready" in desc.stdout
        assert "Model:       sample, version 4" in desc.stdout
        status = up.cli("status")
        assert "schedule" in status.stdout and "node-0" in status.stdout
        assert "FREE CPU" in status.stdout

        # Private to fnplane's user: pods run as another user read none of it.
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        family = descendants(up.proc.pid)
        assert len(family) >= 3, "nats-server, redis-server and a pod run under fnplane up"
    finally:
        code = up.interrupt()
    assert code == 0
    time.sleep(0.2)
    assert [p for p in family if alive(p)] == [], "processes left behind after stop"

    # The service survives a restart: it comes from Redis, not from memory.
    again = Up(state_dir)
    try:
        listing = again.cli("list")
        assert "sample" in listing.stdout, listing.stdout + listing.stderr
    finally:
        assert again.interrupt() == 0


def test_cli_without_a_stack_fails_fast_with_a_clear_message() -> None:
    env = {**os.environ, "FNPLANE_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    t0 = time.monotonic()
    out = subprocess.run([*FNPLANE, "list"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1
    assert "`fnplane up` is not running" in out.stderr
    assert time.monotonic() - t0 < 15


def test_taken_port_is_a_clear_error(state_dir: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [*FNPLANE, "up", "--port", str(port), "--nats-port", str(free_port()),
             "--state-dir", str(state_dir)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )
    assert out.returncode == 1
    assert f"activator port {port} on 127.0.0.1 is already in use" in out.stderr
