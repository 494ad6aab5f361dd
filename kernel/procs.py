"""Processes fnplane starts (servers, pods, instances): ports, output tails, clean stops, and
the guarantee that none outlives the process that started it, even when that process is
SIGKILLed (PR_SET_PDEATHSIG). The servers themselves are in `servers.py`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "ManagedProcess",
    "PortInUseError",
    "ServerStartError",
    "alive",
    "descendants",
    "free_port",
    "pdeathsig_preexec",
    "port_in_use",
    "without_preexec",
]

TAIL_LINES = 200
START_TIMEOUT = 10.0
_LONGEST_LINE = 65536


class ServerStartError(RuntimeError):
    """A server exited or stayed silent during start-up; `tail` holds its last output lines."""

    def __init__(self, message: str, *, tail: str = "") -> None:
        super().__init__(f"{message}\n--- last output ---\n{tail}" if tail else message)
        self.tail = tail


class PortInUseError(ServerStartError):
    """Raised before spawning, so the cause is not buried in a server's log."""


# --- ports -------------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now; callers must tolerate losing a race for it."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when a server could not listen on host:port.

    SO_REUSEADDR keeps sockets left in TIME_WAIT by a previous run (a restart on the same
    port) from counting as "in use"; on Linux a live listener still makes the bind fail.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


# --- no orphans ----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Resolved once, in the parent: the preexec hook runs between fork and exec of a possibly
# multi-threaded process, where loading a library (locks, malloc) could deadlock.
_prctl = _load_prctl()


def pdeathsig_preexec() -> None:
    """preexec_fn that makes the kernel SIGKILL the child when its parent dies (Linux only).

    `stop()` covers orderly exits; this covers a SIGKILLed or crashed parent, which runs no
    cleanup at all. Trap: the kernel watches the *thread* that forked, not the process, so
    spawn from a thread that lives as long as the child should (an event loop's thread, not
    a short-lived executor worker). The process group is left alone on purpose: Ctrl-C in
    a terminal still reaches the servers, and callers decide about groups themselves.
    """
    if _prctl is None:
        return
    parent = os.getppid()
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        # The parent died before the death signal was armed; nobody would ever kill us.
        os.kill(os.getpid(), signal.SIGKILL)


def without_preexec(
    argv: list[str], *, run_as: tuple[int, int] | None = None
) -> tuple[list[str], Callable[[], None] | None]:
    """The same death signal without a preexec_fn: `setpriv --pdeathsig KILL` (util-linux,
    on every Debian) sets it and execs the command. Worth it because any preexec_fn forces
    CPython to fork() the whole parent instead of vfork(), which blocks the event loop for
    ~100 ms per pod in a large process (so do subprocess's user=/group=, hence setpriv's
    --reuid/--regid here). Falls back to a preexec_fn where setpriv is absent.

    `run_as` (uid, gid): the command runs as that user and group with no supplementary
    groups, so it keeps none of the caller's (root's) group memberships either.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        if run_as is None:
            return argv, pdeathsig_preexec
        uid, gid = run_as

        def preexec() -> None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            pdeathsig_preexec()  # after: a change of user clears the death signal

        return argv, preexec
    switch = [] if run_as is None else [f"--reuid={run_as[0]}", f"--regid={run_as[1]}",
                                         "--clear-groups"]
    return [setpriv, "--pdeathsig", "KILL", *switch, "--", *argv], None


def _stat_fields(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat after `comm`, which may itself hold spaces and parentheses."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2 :].split()


def alive(pid: int) -> bool:
    """True while pid runs; a zombie counts as dead, since it only awaits its parent's wait()."""
    if not sys.platform.startswith("linux"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        state = _stat_fields(pid)[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every process whose chain of parents leads to pid (pid itself excluded), from /proc."""
    if not sys.platform.startswith("linux"):
        raise NotImplementedError("descendants() reads /proc and works on Linux only")
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry.name)[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we were scanning
        children[ppid].append(int(entry.name))
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        for child in children.get(frontier.pop(), ()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


# --- one child process ----------------------------------------------------------------------


def _open_log(log_dir: Path, name: str) -> IO[bytes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    return (log_dir / f"{name}.log").open("ab")


class ManagedProcess(asyncio.SubprocessProtocol):
    """A child process whose merged stdout/stderr is drained as it arrives.

    Draining matters twice: a child blocked on a full pipe stops serving, and the last
    lines are what a user needs when a server or pod fails to start (`tail()`). It is its
    own subprocess protocol rather than a wrapper of `asyncio.subprocess.Process`, whose
    `wait()` (before Python 3.12) also waits for the pipe to close, which an orphaned
    grandchild holding the pipe can postpone forever; exit and end of output are tracked
    separately here.
    """

    def __init__(
        self, *, name: str, log_file: IO[bytes] | None = None, tail_lines: int = TAIL_LINES
    ) -> None:
        self.name = name
        self._log_file = log_file
        self._lines: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._pending = b""
        self._waiters: list[tuple[str, asyncio.Future[bool]]] = []
        self._exited = asyncio.Event()
        self._output_closed = asyncio.Event()
        self._stop_lock = asyncio.Lock()
        self._transport: asyncio.SubprocessTransport | None = None

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        name: str,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = pdeathsig_preexec,
        tail_lines: int = TAIL_LINES,
    ) -> ManagedProcess:
        """Spawn argv; output is kept in memory and, with log_dir, appended to <name>.log."""
        if preexec_fn is pdeathsig_preexec:
            # The same death signal without blocking the event loop on a fork().
            argv, preexec_fn = without_preexec(list(argv))
        log_file = _open_log(log_dir, name) if log_dir is not None else None
        self = cls(name=name, log_file=log_file, tail_lines=tail_lines)
        try:
            await asyncio.get_running_loop().subprocess_exec(
                lambda: self,
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                preexec_fn=preexec_fn,
            )
        except BaseException:
            if log_file is not None:
                log_file.close()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self._transport is not None  # set by connection_made() before start() returns
        return self._transport.get_pid()

    @property
    def returncode(self) -> int | None:
        """Exit code once exited; negative for a signal, as in subprocess."""
        return self._transport.get_returncode() if self._transport is not None else None

    def tail(self, lines: int | None = None) -> str:
        """The last output lines (all kept ones by default), newest last."""
        kept = list(self._lines)
        return "\n".join(kept if lines is None else kept[-lines:])

    @property
    def output_ended(self) -> bool:
        """True once the child's end of the pipe is closed (usually: it exited)."""
        return self._output_closed.is_set()

    async def wait(self) -> int:
        """The exit code, as soon as the process has exited (unbounded: callers bound it)."""
        await self._exited.wait()
        code = self.returncode
        assert code is not None  # process_exited() comes after the transport has the code
        return code

    async def wait_for_line(self, text: str) -> bool:
        """True once a line containing text was printed, False if output ended first.

        Unbounded by itself: callers bound it with `asyncio.timeout`.
        """
        if any(text in line for line in self._lines):
            return True
        if self._output_closed.is_set():
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (text, waiter)
        self._waiters.append(entry)
        try:
            return await waiter
        finally:
            self._waiters.remove(entry)

    # `timeout` is the grace between SIGTERM and SIGKILL, not a deadline a caller's
    # asyncio.timeout could replace: cancelling would skip the SIGKILL.
    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout; safe to call again or concurrently.

        Returns the exit code, or None if even SIGKILL did not end it within timeout
        (a process stuck in the kernel).
        """
        async with self._stop_lock:
            if self.returncode is None:
                self._signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(timeout):
                        await self._exited.wait()
                except TimeoutError:
                    self._signal(signal.SIGKILL)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await self._exited.wait()
            if self.returncode is not None:
                # Take the last words, unless a grandchild holds the pipe open.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._output_closed.wait()
                self._close_transport()
        return self.returncode

    def _signal(self, sig: signal.Signals) -> None:
        # Not transport.send_signal(): Popen.send_signal polls first (waitpid WNOHANG), which
        # can reap the child behind asyncio's child watcher; the watcher then reports exit
        # code 255. The pid cannot be recycled while returncode is None: only the watcher
        # reaps it, and it sets returncode right after.
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _close_transport(self) -> None:
        # Only after exit: closing the transport of a live child would poll() and kill() it,
        # with the same reaping race as above.
        if self._transport is not None and self.returncode is not None:
            self._transport.close()

    # asyncio.SubprocessProtocol callbacks, all on the event loop's thread.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's process transport is not an asyncio.SubprocessTransport subclass.
        self._transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        chunk = data.encode() if isinstance(data, str) else data
        self._log(chunk)
        *complete, self._pending = (self._pending + chunk).split(b"\n")
        if len(self._pending) > _LONGEST_LINE:  # a runaway line: keep it rather than grow
            complete.append(self._pending)
            self._pending = b""
        for raw in complete:
            self._add_line(raw)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if self._pending:
            self._add_line(self._pending)
            self._pending = b""
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(False)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._output_closed.set()
        self._close_transport()

    def process_exited(self) -> None:
        self._exited.set()
        if self._output_closed.is_set():
            self._close_transport()

    def _log(self, chunk: bytes) -> None:
        if self._log_file is None:
            return
        try:
            self._log_file.write(chunk)
            self._log_file.flush()
        except OSError:
            # A full disk must not stop the draining, or the child blocks on its pipe.
            self._log_file.close()
            self._log_file = None
            self._lines.append(f"[fnplane: log file write failed; {self.name}.log is incomplete]")

    def _add_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self._lines.append(line)
        for text, waiter in self._waiters:
            if text in line and not waiter.done():
                waiter.set_result(True)


# --- the two servers -----------------------------------------------------------------------


