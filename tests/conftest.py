"""Real nats-server and redis-server for the whole test session (STYLE.md §12).

The servers are started through `kernel.procs`, as `fnplane up` starts them, on free
loopback ports in a temporary directory, and are stopped at session teardown whether tests
passed or not; if pytest itself is SIGKILLed, PR_SET_PDEATHSIG takes them down with it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis

from controlplane.servers import NatsServer, RedisServer, start_nats, start_redis

_T = TypeVar("_T")

# Database 0 stays free for code that uses RedisServer.url as is; tests rotate over the
# other 15 (redis' default `databases 16`) and each gets its database flushed first.
_TEST_DBS = itertools.cycle(range(1, 16))


class ServerLoop:
    """A private event loop on its own thread that owns the session's servers.

    Why not async session fixtures in pytest-asyncio's session loop? That needs every async
    test moved into the session loop too (a marker added at collection), and then any
    function-scoped async fixture, which defaults to a function loop here, runs in a
    different loop than its test: futures and connections cross loops and fail. Servers are
    separate processes reached by URL, so the test's loop does not matter to them; keeping
    them on this loop lets tests use whatever loop scope they like, lets synchronous tests
    (CLI runs) share them, and a test that blocks or leaks tasks cannot stall the readers
    that drain the servers' output. The thread lives for the whole session on purpose:
    PR_SET_PDEATHSIG fires when the *thread* that spawned a child exits.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fnplane-test-servers", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        """Run coro on the server loop and wait for its result, at most timeout seconds."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


@pytest.fixture(scope="session")
def server_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="session")
def nats_server(
    server_loop: ServerLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsServer]:
    """nats-server with JetStream, shared by the session; tests must not stop it."""
    server = server_loop.run(start_nats(tmp_path_factory.mktemp("nats-server")), timeout=30)
    try:
        yield server
    finally:
        server_loop.run(server.stop(), timeout=20)


@pytest.fixture(scope="session")
def redis_server(
    server_loop: ServerLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """redis-server (append-only), shared by the session; tests must not stop it."""
    server = server_loop.run(start_redis(tmp_path_factory.mktemp("redis-server")), timeout=30)
    try:
        yield server
    finally:
        server_loop.run(server.stop(), timeout=20)


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """URL of the session's nats-server; subjects and streams are shared, so name them uniquely."""
    return nats_server.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty Redis database of the session's server, so tests never see each
    other's keys (databases rotate and are flushed before each test, not after: leftovers
    of a failed test stay inspectable until its database comes round again)."""
    db = next(_TEST_DBS)
    client = redis.Redis(host=redis_server.host, port=redis_server.port, db=db, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.db_url(db)


# ---- components a test left running --------------------------------------------------------
# A component a test starts and never stops keeps its heartbeats, maps and subscriptions on
# the session's shared NATS for the rest of the run: later tests see its messages (two
# flakes came from that) and pay for its CPU. Each component's metrics live until it stops
# (kernel/metrics.py), so those still live after a test's own teardown are what it left.

_LEFT_RUNNING: dict[str, list[str]] = {}


@pytest.fixture(autouse=True)
def _components_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    from kernel import metrics

    before = {id(m) for m in metrics.live()}
    yield
    left = [m.component for m in metrics.live() if id(m) not in before]
    if left:
        _LEFT_RUNNING[request.node.nodeid] = left


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LEFT_RUNNING:
        terminalreporter.section("components left running by tests")
        for test, left in sorted(_LEFT_RUNNING.items()):
            terminalreporter.write_line(f"{test}: {', '.join(sorted(left))}")
