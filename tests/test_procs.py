"""kernel.procs and .servers: real servers start, answer, stop, leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis

from controlplane.servers import start_nats, start_redis
from kernel import procs
from kernel.procs import (
    ManagedProcess,
    PortInUseError,
    ServerStartError,
    alive,
    descendants,
    free_port,
    port_in_use,
)

REPO = Path(__file__).resolve().parent.parent


def wait_until_dead(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


def kill_quietly(pid: int) -> None:
    if pid <= 0:
        return  # never signal a process group by accident
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the session servers ---------------------------------------------------------------------


async def test_nats_publish_subscribe_round_trip(nats_url: str) -> None:
    subject = f"test.procs.{uuid.uuid4().hex}"
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        sub = await nc.subscribe(subject)
        await nc.publish(subject, b"hello")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"
    finally:
        await nc.drain()


async def test_nats_has_jetstream(nats_url: str) -> None:
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.drain()


async def test_redis_set_get(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"
    finally:
        await client.aclose()


@pytest.mark.parametrize("turn", [1, 2])
async def test_each_test_gets_an_empty_redis_db(redis_url: str, turn: int) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        assert await client.dbsize() == 0
        await client.set("left-behind", turn)
    finally:
        await client.aclose()


# --- ports -----------------------------------------------------------------------------------


def test_free_port_is_not_in_use() -> None:
    assert not port_in_use("127.0.0.1", free_port())


async def test_taken_port_is_refused_before_spawning(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        for start in (start_nats, start_redis):
            with pytest.raises(PortInUseError) as caught:
                await start(tmp_path, port=port)
            assert str(caught.value) == (
                f"port {port} on 127.0.0.1 is already in use (pass another port)"
            )
    assert not (tmp_path / "logs").exists(), "nothing should have been spawned"


# --- start and stop ----------------------------------------------------------------------------


async def test_stopped_nats_leaves_no_process(tmp_path: Path) -> None:
    server = await start_nats(tmp_path)
    pid = server.process.pid
    assert alive(pid)
    assert pid in descendants(os.getpid())
    await server.stop()
    await server.stop()  # idempotent
    assert not alive(pid)
    assert "Server is ready" in (tmp_path / "logs" / "nats-server.log").read_text()


async def test_redis_keeps_data_across_restart(tmp_path: Path) -> None:
    server = await start_redis(tmp_path)
    try:
        client = aioredis.Redis.from_url(server.url, socket_timeout=5)
        await client.set("service:echo", "spec")
        await client.aclose()
    finally:
        await server.stop()
    assert not alive(server.process.pid)
    # SHUTDOWN (not SIGTERM/SIGKILL) ended it: redis says so in its log.
    assert "User requested shutdown" in server.process.tail()

    again = await start_redis(tmp_path)
    try:
        client = aioredis.Redis.from_url(again.url, socket_timeout=5)
        assert await client.get("service:echo") == b"spec"
        await client.aclose()
    finally:
        await again.stop()


async def test_server_that_exits_early_reports_its_output(tmp_path: Path) -> None:
    (tmp_path / "nats").write_text("")  # JetStream's store directory is taken by a file
    with pytest.raises(ServerStartError) as caught:
        await start_nats(tmp_path, port=free_port())
    assert "exited with code 1" in str(caught.value)
    assert "storage directory" in caught.value.tail


async def test_server_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    before = descendants(os.getpid())
    with pytest.raises(ServerStartError, match="was not ready in time"):
        await start_nats(tmp_path, ready_timeout=0)
    assert descendants(os.getpid()) <= before


async def test_lost_race_for_a_free_port_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        offers = iter([taken.getsockname()[1], free_port()])  # the first one gets "stolen"
        monkeypatch.setattr(procs, "free_port", lambda host: next(offers))
        server = await start_redis(tmp_path)
        try:
            assert server.port != taken.getsockname()[1]
        finally:
            await server.stop()


# --- ManagedProcess --------------------------------------------------------------------------


async def test_managed_process_keeps_output_tail_and_log(tmp_path: Path) -> None:
    proc = await ManagedProcess.start(
        ["sh", "-c", "echo out; echo err >&2; exec sleep 60"], name="chatty", log_dir=tmp_path
    )
    async with asyncio.timeout(5):
        assert await proc.wait_for_line("err")
    assert proc.tail().splitlines() == ["out", "err"]
    assert await proc.stop() == -signal.SIGTERM
    assert (tmp_path / "chatty.log").read_text() == "out\nerr\n"


async def test_stop_escalates_to_sigkill_and_is_idempotent() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code += "print('armed', flush=True); time.sleep(60)"
    proc = await ManagedProcess.start([sys.executable, "-c", code], name="stubborn")
    async with asyncio.timeout(10):
        assert await proc.wait_for_line("armed")
    results = await asyncio.gather(proc.stop(timeout=0.3), proc.stop(timeout=0.3))
    assert results == [-signal.SIGKILL, -signal.SIGKILL]
    assert await proc.stop() == -signal.SIGKILL
    assert not alive(proc.pid)


# --- no process left behind --------------------------------------------------------------------


async def first_line(proc: ManagedProcess, within: float = 10.0) -> str:
    async with asyncio.timeout(within):
        assert await proc.wait_for_line(""), proc.tail()  # "" is in every line
    return proc.tail().splitlines()[0]


async def test_descendants_finds_grandchildren() -> None:
    proc = await ManagedProcess.start(["sh", "-c", "sleep 60 & echo $!; wait"], name="parent")
    sleep_pid = -1
    try:
        sleep_pid = int(await first_line(proc))
        assert descendants(proc.pid) == {sleep_pid}
        assert {proc.pid, sleep_pid} <= descendants(os.getpid())
    finally:
        kill_quietly(sleep_pid)  # first: it holds the output pipe stop() would wait for
        await proc.stop()


def test_zombie_counts_as_dead() -> None:
    child = subprocess.Popen(["true"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 5
        while ") Z " not in stat.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stat.exists(), "still a zombie: not reaped yet"
        assert not alive(child.pid)
    finally:
        child.wait(timeout=5)


# The middle process spawns `sleep 60` (with or without the death signal) and reports its pid.
MIDDLE = textwrap.dedent(
    """
    import subprocess, sys, time
    from kernel.procs import pdeathsig_preexec
    hook = pdeathsig_preexec if sys.argv[1] == "yes" else None
    child = subprocess.Popen(["sleep", "60"], preexec_fn=hook)
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize(("pdeathsig", "sleep_survives"), [(True, False), (False, True)])
async def test_sigkilled_parent_takes_children_along(pdeathsig: bool, sleep_survives: bool) -> None:
    argv = [sys.executable, "-c", MIDDLE, "yes" if pdeathsig else "no"]
    middle = await ManagedProcess.start(argv, name="middle", cwd=REPO)
    sleep_pid = -1
    try:
        sleep_pid = int(await first_line(middle))
        assert alive(sleep_pid)
        os.kill(middle.pid, signal.SIGKILL)  # the middle process runs no cleanup at all
        async with asyncio.timeout(5):
            await middle.wait()
        assert wait_until_dead(sleep_pid, within=2.0) is not sleep_survives
    finally:
        kill_quietly(sleep_pid)  # first: it holds the output pipe stop() would wait for
        await middle.stop()
