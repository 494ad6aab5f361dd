"""The gateway's sockets, hardened: a connection cap and a header-read watchdog in front of
aiohttp's own protocol. aiohttp has no header timeout (its keep-alive timer is not reset by
a client trickling bytes, but it only fires once per keep-alive period) and no connection
limit, so a slowloris client or 20,000 idle sockets could hold the process's descriptors
until pods failed to spawn with "Too many open files". Both checks live at the protocol
level, before aiohttp parses anything, and answer in KServe's error shape; so do aiohttp's
own pages for a request it cannot parse."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import BaseRunner, BaseSite

log = logging.getLogger(__name__)

# After an answer sent before the body was read (408, 413, 503), aiohttp reads and drops the
# rest of the body for this long so the client sees the answer, then closes. Its default
# (10 s) would let a stalled client keep its slot that much longer.
LINGERING_TIME_S = 2.0


def connection_cap(configured: int, open_files: int, reserve: int) -> int:
    """How many client connections fit the open-files limit: each may hold a second
    descriptor to a pod while its request is proxied, and `reserve` descriptors stay for
    the rest of the process. Never below 1: a misfit limit still serves, and says so."""
    return max(1, min(configured, (open_files - reserve) // 2))


def raw_answer(status: int, reason: str, message: str, *, retry_after_s: int = 0) -> bytes:
    """A complete HTTP/1.1 answer in KServe's error shape, for the places that answer before
    aiohttp has a request (and close the connection after it)."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after_s:
        head.append(f"Retry-After: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class JsonErrorPages(RequestHandler):
    """aiohttp's protocol, with the pages it writes itself — a request line, header or length
    it cannot parse (400), a header line too long — in KServe's error shape instead of plain
    text. They never reach the application, so the gateway's middleware cannot."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        page = super().handle_error(request, status, exc, message)  # logs it, as before
        answer = web.json_response({"error": (message or HTTPStatus(page.status).phrase)
                                    .strip()}, status=page.status)
        answer.force_close()
        return answer


def json_error_pages(server: web.Server) -> Callable[[], RequestHandler]:
    """`server`'s protocol factory, building `JsonErrorPages` with the same settings (what
    web.Server.__call__ does, with our class)."""
    return lambda: JsonErrorPages(server, loop=server._loop, **server._kwargs)


class ConnectionGuard:
    """Counts the listener's connections and watches each one's headers. Beyond `cap` a new
    connection gets a 503 and is closed at once (its descriptor lives one loop iteration).
    A request whose headers are not complete `header_timeout_s` after its first byte (after
    the accept, for a connection's first request) is cut: a 408 if it was the connection's
    first request, else a plain close, as a keep-alive client cannot tell an unsolicited
    answer from the one to its next request. aiohttp's keep-alive timer closes idle
    connections; the middleware tells the watchdog when a request's headers are complete."""

    def __init__(self, *, cap: int, header_timeout_s: float, retry_after_s: int) -> None:
        self.cap = cap
        self.header_timeout_s = header_timeout_s
        self.refused = 0  # connections answered 503 for the cap, since start
        # Stopping: every answer closes its connection, so a keep-alive client does not
        # send its next request into a connection the shutdown is about to close.
        self.draining = False
        self.cut = 0  # connections closed by the header watchdog, since start
        self._open: dict[asyncio.BaseProtocol, _Guarded] = {}  # aiohttp's protocol → ours
        self._refusal = raw_answer(503, "Service Unavailable",
                                   f"the gateway is at its limit of {cap} connections",
                                   retry_after_s=retry_after_s)
        self._timeout = raw_answer(408, "Request Timeout",
                                   f"request headers not received within "
                                   f"{header_timeout_s:g}s")

    @property
    def open(self) -> int:
        return len(self._open)

    def protocol_factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], Any]:
        """What `loop.create_server` calls per accepted connection; `make` builds aiohttp's
        protocol, only for connections under the cap."""
        return lambda: _Guarded(self, make)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        conn = self._open.get(request.protocol)
        if conn is not None:
            conn.headers_complete()
        try:
            response = await handler(request)
            if self.draining:
                response.force_close()
            return response
        finally:
            if conn is not None:
                conn.request_done()


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, the cap and the header watchdog outside."""

    def __init__(self, guard: ConnectionGuard, make: Callable[[], asyncio.Protocol]) -> None:
        self.guard = guard
        self.make = make
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request's headers are complete and it is being handled
        self.started = 0  # requests that reached the application
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        guard = self.guard
        if guard.open >= guard.cap:
            guard.refused += 1
            transport.write(guard._refusal)
            transport.close()
            return
        self.inner = self.make()
        guard._open[self.inner] = self
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if not self.busy and self.watchdog is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.inner is not None:
            inner, self.inner = self.inner, None
            self.guard._open.pop(inner, None)
            inner.connection_lost(exc)

    def headers_complete(self) -> None:
        self.busy = True
        self.started += 1
        self._disarm()

    def request_done(self) -> None:
        self.busy = False

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.watchdog = loop.call_later(self.guard.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    def _expired(self) -> None:
        self.watchdog = None
        transport = self.transport
        if self.busy or transport is None or transport.is_closing():
            return
        self.guard.cut += 1
        if not self.started:
            transport.write(self.guard._timeout)
        transport.close()


class GuardedSite(BaseSite):
    """aiohttp's TCPSite with the guard between the listening socket and aiohttp."""

    def __init__(self, runner: BaseRunner, host: str, port: int, guard: ConnectionGuard, *,
                 backlog: int = 2048, reuse_port: bool = False) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.guard = guard
        self.reuse_port = reuse_port  # gateway workers share one port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the kernel's choice for 0)."""
        server = self._server
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "runner.setup() first"
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.protocol_factory(json_error_pages(server)), self._host, self._port,
            backlog=self._backlog, reuse_port=self.reuse_port or None,
        )

