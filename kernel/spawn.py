"""Starting a pod's process without stopping the event loop: `spawn` is what the local node
agent uses instead of `loop.subprocess_exec`, so pods started at once never wait on each other.

Why not the loop's own subprocess support: uvloop (the loop `fnplane up` runs) spawns through
libuv, which fork()s the whole parent and waits for the child's exec. Copying the page tables
of a large process (the embedded stack) takes tens of ms, hundreds while the CPUs are busy
with other pods starting, and the loop stands still meanwhile: 25 pods woken at once took
over a second each to spawn. CPython's `subprocess.Popen` with no preexec_fn (and no user=,
group=) uses vfork() (3.10+), whose cost does not grow with the parent. The death signal
and the user switch a preexec_fn would have done are `setpriv`'s (`procs.without_preexec`).

The process is then watched without a child watcher: its exit through a pidfd the loop polls
(a thread blocked in waitpid() where pidfds are missing), its output through a pipe the loop
polls, on uvloop and asyncio alike.
Pods may start at a lower CPU priority than the control plane (`nice`, the nodes'
`pod_nice`), as a kubelet keeps CPU reserved for the system, so a hundred pods importing
their frameworks at once do not starve the loop that places, probes and routes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kernel.procs import without_preexec

__all__ = ["Child", "spawn"]

# The threads that start pods. Not the loop's thread: even a vfork() parent waits until its
# child has exec'd, which takes milliseconds when the CPUs are busy with other pods starting
# (CPython lets go of the GIL meanwhile, so the loop goes on). Not the loop's default
# executor either: the kernel's death signal fires when the thread that started a pod
# ends, and these threads end only with the interpreter (a pool's workers never retire).
READ_CHUNK = 65536
_SPAWNER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fnplane-spawn")


class Child:
    """A spawned process: what the node agent needs of `asyncio.subprocess.Process` (pid,
    returncode, wait(), stdout as a StreamReader), and nothing that could reap it behind
    our back (only `_reap` calls waitpid, through Popen.poll)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: asyncio.StreamReader) -> None:
        self._popen = popen
        self.stdout = stdout
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfd = -1

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once reaped; negative for a signal, as in subprocess."""
        return self._popen.returncode if self._exited.is_set() else None

    async def wait(self) -> int:
        await self._exited.wait()
        code = self._popen.returncode
        assert code is not None
        return code

    def _watch(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: a thread per pod instead
            threading.Thread(target=self._wait_in_thread, name=f"wait-{self.pid}",
                             daemon=True).start()
            return
        # Readable once the process has exited (even if it already had: a zombie counts).
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        if self._popen.poll() is None:
            return  # not yet (a spurious wake-up)
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._exited.set()

    def _wait_in_thread(self) -> None:
        self._popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop closed first: nobody waits
            self._loop.call_soon_threadsafe(self._exited.set)


async def spawn(
    argv: list[str], *, cwd: Path, env: Mapping[str, str],
    run_as: tuple[int, int] | None = None, nice: int = 0,
) -> Child:
    """Start argv in a session (and process group) of its own, stdin from /dev/null, stdout
    and stderr merged into one pipe; killed by the kernel when this process dies, even by
    SIGKILL; as `run_as` (uid, gid) with no supplementary groups when given. Raises OSError
    when it cannot be started."""
    argv, preexec = without_preexec(argv, run_as=run_as)
    start = functools.partial(_start, argv, cwd=cwd, env=dict(env), preexec=preexec, nice=nice)
    loop = asyncio.get_running_loop()
    started = loop.run_in_executor(_SPAWNER, start)
    try:
        await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_kill_orphan)  # it may start after all: nobody owns it
        raise
    popen, out = started.result()
    reader = asyncio.StreamReader(loop=loop)
    _follow(loop, out, reader)
    child = Child(popen, reader)
    child._watch()
    return child


def _start(argv: list[str], *, cwd: Path, env: dict[str, str],
           preexec: Callable[[], None] | None, nice: int) -> tuple[subprocess.Popen[bytes], int]:
    """The process, and the read end of its output pipe. The pipe is ours, not Popen's: its
    read end has one owner (`_follow`), never a file object that a garbage collection could
    close again after the number was reused (by a socket, say)."""
    out, into = os.pipe()  # both close-on-exec; the child gets `into` as its fds 1 and 2
    try:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=into,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,  # one process group to stop, children and all
            preexec_fn=preexec,  # None where setpriv exists: only then is vfork used
        )
    except BaseException:
        os.close(out)
        raise
    finally:
        os.close(into)
    if nice:
        _lower_priority(popen.pid, nice)
    return popen, out


def _follow(loop: asyncio.AbstractEventLoop, fd: int, reader: asyncio.StreamReader) -> None:
    """Feed what arrives on `fd` into `reader` until end of file, then close `fd` (after the
    loop stopped watching it, so the number is free only once nothing refers to it)."""
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            reader.feed_data(data)
            return
        loop.remove_reader(fd)
        os.close(fd)
        reader.feed_eof()

    loop.add_reader(fd, readable)


def _kill_orphan(started: asyncio.Future[tuple[subprocess.Popen[bytes], int]]) -> None:
    if not started.cancelled() and started.exception() is None:
        popen, out = started.result()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        os.close(out)


def _lower_priority(pid: int, nice: int) -> None:
    """Give the new process (and all it starts: both are inherited) the nice value `nice`.
    Its session is an autogroup of its own where the kernel groups by session (Linux's
    sched_autogroup, on by default), and a nice value only weighs within its autogroup:
    the autogroup's own nice is what ranks it against the control plane, so both are set.
    Best effort: a process already gone, or a kernel without autogroups, changes nothing."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write(str(nice))
