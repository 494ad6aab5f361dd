"""How the local node agent starts pods (kernel/spawn.py), with real processes: a pod runs in a
session of its own, at the nice value asked, its output and exit code are seen, many start at
once without one failing, and a SIGKILLed parent (under uvloop, as `fnplane up` runs) takes
its pods along: the guarantees `loop.subprocess_exec` with a preexec_fn used to give."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

from kernel.procs import ManagedProcess, alive
from kernel.spawn import spawn

REPO = Path(__file__).resolve().parent.parent
ENV = {"PATH": os.environ["PATH"]}

REPORT = "import os; print(os.getpid(), os.getsid(0), os.getpgid(0), os.nice(0), flush=True)"


async def test_a_pod_runs_in_its_own_session_at_its_nice_value_and_its_exit_is_seen() -> None:
    child = await spawn([sys.executable, "-c", REPORT + "; raise SystemExit(3)"],
                        cwd=REPO, env=ENV, nice=7)
    line = await asyncio.wait_for(child.stdout.readline(), timeout=10)
    pid, sid, pgid, nice = (int(x) for x in line.split())
    assert pid == sid == pgid == child.pid  # setpriv execs the pod: one process, its session
    assert nice == 7
    assert await asyncio.wait_for(child.wait(), timeout=10) == 3
    assert child.returncode == 3


async def test_pods_started_at_once_all_start_and_all_are_reaped() -> None:
    children = await asyncio.gather(
        *(spawn(["sh", "-c", f"echo pod-{i}"], cwd=REPO, env=ENV) for i in range(20)))
    assert len({c.pid for c in children}) == 20
    lines = await asyncio.wait_for(
        asyncio.gather(*(c.stdout.readline() for c in children)), timeout=20)
    assert sorted(lines) == sorted(f"pod-{i}\n".encode() for i in range(20))
    codes = await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), timeout=20)
    assert codes == [0] * 20


async def test_a_signalled_pod_reports_the_signal() -> None:
    child = await spawn(["sleep", "60"], cwd=REPO, env=ENV)
    os.killpg(child.pid, signal.SIGTERM)
    assert await asyncio.wait_for(child.wait(), timeout=10) == -signal.SIGTERM


MIDDLE = textwrap.dedent(
    """
    import asyncio, os, uvloop
    from pathlib import Path
    from kernel.spawn import spawn

    async def main():
        child = await spawn(["sleep", "60"], cwd=Path("."), env={"PATH": os.environ["PATH"]})
        print(child.pid, flush=True)
        await asyncio.sleep(60)

    uvloop.run(main())
    """
)


async def test_a_sigkilled_parent_takes_its_pods_along() -> None:
    middle = await ManagedProcess.start([sys.executable, "-c", MIDDLE], name="middle", cwd=REPO)
    pod = -1
    try:
        async with asyncio.timeout(10):
            while not middle.tail():
                await asyncio.sleep(0.02)
        pod = int(middle.tail().split()[0])
        assert alive(pod)
        os.kill(middle.pid, signal.SIGKILL)  # no cleanup runs in the parent at all
        async with asyncio.timeout(5):
            await middle.wait()
        async with asyncio.timeout(5):
            while alive(pod):
                await asyncio.sleep(0.02)
    finally:
        if pod > 0 and alive(pod):
            os.kill(pod, signal.SIGKILL)
        await middle.stop()
