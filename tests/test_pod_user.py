"""Pods contained when fnplane runs as root: a local pod runs as the unprivileged
`fnplane-pod` where that user can reach its program and workdir, it cannot read the state
dir (credentials, NATS's config, Redis's data: the dir is 0700), and nothing it started
survives its delete. Where the pod user cannot reach the program (this machine's Python
lives under root's 0700 home), `auto` runs the pod as root and says why; a forced user
refuses the pod with the path in the way."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.stack import Stack
from controlplane.statedir import check_state_dir
from kernel import endpoints as ep
from kernel.identity import CREDENTIALS_FILE, Login, login
from kernel.messages import NameRequest, ScalingSpec, ServiceStatus
from kernel.procs import alive
from partitions.agents.local import pod_path
from partitions.agents.podusers import (
    AUTO,
    CURRENT,
    DEFAULT_POD_USER,
    PodUserError,
    PodUsers,
    blocked,
    obstacle,
)
from tests.stackutil import admin, deploy, sample_spec, stack_config, wait_until

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching a pod's user needs root")
SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A dir anyone may enter, unlike pytest's tmp_path (under a 0700 dir): only what
    fnplane itself closes keeps the pod user out of it."""
    path = Path(tempfile.mkdtemp(prefix="fnplane-pod-user-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_state_dir_is_made_and_kept_private(tmp_path: Path) -> None:
    fresh, older = tmp_path / "fresh", tmp_path / "older"
    older.mkdir(mode=0o755)  # as a release before this one left it
    for state in (fresh, older):
        check_state_dir(state)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_reachability_follows_every_directory_and_the_real_path(open_dir: Path) -> None:
    closed = open_dir / "closed"
    closed.mkdir(mode=0o700)
    (closed / "tool").write_text("#!/bin/sh\n")
    (closed / "tool").chmod(0o755)
    (open_dir / "link").symlink_to(closed / "tool")
    (open_dir / "script").write_text(f"#!{closed / 'tool'}\n")
    (open_dir / "script").chmod(0o755)
    nobody = (65534, 65534)

    assert blocked(Path("/bin/sh"), *nobody, want=1) is None
    assert blocked(closed / "tool", *nobody, want=1) == f"{closed / 'tool'} ({closed} is mode 0700)"
    # A symlink in an open dir to a closed place (a venv's python) is as closed.
    assert "is mode 0700" in (blocked(open_dir / "link", *nobody, want=1) or "")
    # A script is as reachable as its interpreter.
    assert "is mode 0700" in (obstacle([str(open_dir / "script")], "", open_dir, *nobody) or "")
    assert obstacle(["/bin/sh"], "", closed, *nobody) == f"{closed} ({closed} is mode 0700)"
    assert obstacle(["/bin/sh"], "", open_dir, *nobody) is None
    # What a shell script names counts: a program run from it, a file it writes.
    wrapper = ["/bin/sh", "-c", f'echo hi > "{closed}/out"; exec "{open_dir}/link" --flag']
    assert "is mode 0700" in (obstacle(wrapper, "", open_dir, *nobody) or "")
    assert obstacle(wrapper, "", open_dir, *nobody, inside_shell=False) is None
    assert obstacle(["/bin/sh", "-c", "exec tool"], str(closed), open_dir, *nobody) \
        == f"{closed / 'tool'} ({closed} is mode 0700)"


@as_root
async def test_auto_runs_an_unreachable_program_as_root_and_says_why(open_dir: Path) -> None:
    path = f"{open_dir}{os.pathsep}{pod_path()}"
    closed = open_dir / "closed"
    closed.mkdir(mode=0o700)
    (closed / "serve").write_text("#!/bin/sh\n")
    (closed / "serve").chmod(0o755)
    auto = PodUsers(AUTO, workdir=open_dir)

    serve = str(closed / "serve")
    forced = PodUsers(DEFAULT_POD_USER, workdir=open_dir)

    run_as = await auto.run_as("svc", [serve], path)
    assert run_as.ids is None and run_as.user == "root"
    assert f"{DEFAULT_POD_USER} cannot reach {serve}" in run_as.describe()
    # The sample as this machine runs it: the venv's python is a link under /root.
    assert (await auto.run_as("svc", [sys.executable, "-m", "x"], path)).user == "root"
    assert (await auto.run_as("svc", ["/bin/sh", "-c", f"exec {serve}"], path)).user == "root"
    assert (await auto.run_as("svc", ["/bin/sh"], path)).user == DEFAULT_POD_USER
    with pytest.raises(PodUserError, match=f"it cannot reach {serve}"):
        await forced.run_as("svc", [serve], path)
    # A forced user is refused only what it certainly cannot start.
    assert (await forced.run_as("svc", ["/bin/sh", "-c", f"exec {serve}"], path)).ids
    assert (await PodUsers(CURRENT, workdir=open_dir).run_as("svc", ["/bin/sh"], path)).ids \
        is None


@as_root
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="the pod serves HTTP with /usr/bin/python3")
async def test_a_pod_runs_unprivileged_reads_no_state_and_leaves_nothing(open_dir: Path) -> None:
    state = open_dir / "state"
    config = stack_config(state)
    # Forced: this pod's script names the state dir, which `auto` would see as out of reach
    # and run as root rather than fail.
    config = replace(config, nodes=replace(config.nodes, workdir=open_dir,
                                           pod_user=DEFAULT_POD_USER))
    # The pod reports who it is and what it could read, starts a child that would outlive
    # it, then serves readiness with a Python the pod user can reach.
    creds_file = state / CREDENTIALS_FILE
    script = (
        'echo "uid=$(id -u)"; '
        f'cat "{creds_file}" >/dev/null 2>&1 && echo creds=read || echo creds=refused; '
        f'ls "{state}" >/dev/null 2>&1 && echo state=listed || echo state=refused; '
        'sleep 300 & echo "grandchild=$!"; '
        f'exec {SYSTEM_PYTHON} -m http.server "$PORT" --bind 127.0.0.1'
    )
    spec = sample_spec("contained", command=["/bin/sh", "-c", script], readiness_path="/",
                       scaling=ScalingSpec(min_scale=1, initial_scale=1))
    stack = Stack(config, nats_port=None)
    await stack.start()
    try:
        assert stack.nats_url is not None
        assert stat.S_IMODE(state.stat().st_mode) == 0o700 and creds_file.exists()
        creds = login(stack.config.credentials, "admin")
        await deploy(stack.nats_url, spec, creds)
        st = await wait_until(lambda: _describe(stack.nats_url or "", creds),
                              lambda s: s.ready_pods >= 1, timeout=30, what="the pod ready")
        pod = st.pods[0]
        assert pod.run_as == DEFAULT_POD_USER
        said = dict(line.split("=", 1) for line in (state / "pods" / f"{pod.pod}.log")
                    .read_text().splitlines() if "=" in line and " " not in line)
        grandchild = int(said["grandchild"])
        assert alive(grandchild)
        async with admin(stack.nats_url, creds) as bus:
            await bus.call(ep.ADMIN_DELETE, NameRequest(name="contained"), timeout=5)
        await wait_until(lambda: _value(alive(grandchild)), lambda up: not up, timeout=15,
                         what="the pod's child gone after delete")
    finally:
        await stack.stop()
    assert said["uid"] != "0" and int(said["uid"]) == _uid(DEFAULT_POD_USER)
    assert said["creds"] == "refused" and said["state"] == "refused"
    # The state dir is all that kept it out: the dir around it is open to anyone.
    assert stat.S_IMODE(open_dir.stat().st_mode) == 0o755


async def _describe(nats_url: str, creds: Login | None) -> ServiceStatus:
    async with admin(nats_url, creds) as bus:
        return await bus.call(ep.ADMIN_DESCRIBE, NameRequest(name="contained"), timeout=5)


async def _value(v: bool) -> bool:
    return v


def _uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid
