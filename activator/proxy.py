"""Forwarding one inference request to one pod. Distinguishes "the pod never got it"
(connection refused or reset before any answer: safe to send elsewhere) from "the pod got it
and failed" (must be reported, never silently replayed). A streamed answer (SSE, chunked) is
handed back as a `PodStream` the moment its headers arrive, so its chunks reach the client as
the pod writes them; the service's Knative timeouts bound every wait (`Limits`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from kernel.messages import ServiceSpec

# Headers worth carrying to the pod; hop-by-hop ones are the HTTP client's business.
FORWARD_HEADERS = ("content-type", "accept", "traceparent", "tracestate", "x-request-id")
# Answers with no body by definition: never a stream.
_NO_BODY = frozenset({204, 304})


class PodUnreachable(Exception):
    """The request did not reach the pod; it may be retried on another one."""


class PodTimeout(Exception):
    """One of the service's timeouts expired: `which` is Knative's field it comes from
    (timeoutSeconds, responseStartTimeoutSeconds, idleTimeoutSeconds)."""

    def __init__(self, which: str, seconds: float) -> None:
        super().__init__(f"{which} {seconds:g}s expired")
        self.which = which
        self.seconds = seconds


@dataclass(frozen=True)
class Limits:
    """A request's three timeouts, as Knative's RevisionSpec names them: the whole request,
    its first byte (None: the whole request's), the gap between two chunks (0: none)."""

    timeout_s: float = 300.0
    response_start_timeout_s: float | None = None
    idle_timeout_s: float = 0.0

    @classmethod
    def of(cls, spec: ServiceSpec) -> Limits:
        return cls(spec.timeout_s, spec.response_start_timeout_s, spec.idle_timeout_s)


class PodStream:
    """The rest of a pod's streamed answer, chunk by chunk as the pod writes them. Whoever
    holds it must `close()` it: that ends the pod request (the pod sees its client leave)."""

    def __init__(self, resp: aiohttp.ClientResponse, deadline: float, limits: Limits) -> None:
        self._resp = resp
        self._deadline = deadline  # on the loop's clock
        self._limits = limits
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await _next_chunk(self._resp, self._deadline, self._limits):
            yield chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._resp.close()  # not release(): an unfinished answer must not be pooled


@dataclass(frozen=True)
class PodResponse:
    status: int
    body: bytes
    content_type: str
    first_byte_at: float
    stream: PodStream | None = None  # the body still to come, when streamed


async def _next_chunk(resp: aiohttp.ClientResponse, deadline: float, limits: Limits) -> bytes:
    """The next bytes the pod wrote (b"" at the end), within the idle and whole-request
    timeouts, whichever ends first."""
    loop = asyncio.get_running_loop()
    until, which, seconds = deadline, "timeoutSeconds", limits.timeout_s
    if limits.idle_timeout_s and loop.time() + limits.idle_timeout_s < deadline:
        until, which, seconds = (loop.time() + limits.idle_timeout_s, "idleTimeoutSeconds",
                                 limits.idle_timeout_s)
    try:
        async with asyncio.timeout_at(until):
            return await resp.content.readany()
    except TimeoutError:
        raise PodTimeout(which, seconds) from None


def is_streamed(resp: aiohttp.ClientResponse) -> bool:
    """Server-sent events, or a successful answer of unknown length (chunked): what a pod
    writes as it goes. An error page or a sized body is read whole, as before."""
    if not 200 <= resp.status < 300 or resp.status in _NO_BODY:
        return False
    return (resp.content_type == "text/event-stream" or resp.content_length is None)


class Proxy:
    def __init__(self, *, timeout_s: float, connect_timeout_s: float = 2.0,
                 max_connections: int = 0) -> None:
        # No total on the session: a stream may outlive any one number; each request is
        # bounded by its service's Limits (`timeout_s` when none are given).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._default = Limits(timeout_s=timeout_s)
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # The throttler bounds concurrency per pod; this bounds the descriptors (0: none),
        # idle pooled connections included.
        connector = aiohttp.TCPConnector(limit=self._limit, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self, base_url: str, method: str, path: str, body: bytes, headers: dict[str, str],
        *, limits: Limits | None = None, stream: bool = False,
    ) -> PodResponse:
        """The pod's answer: whole, or (`stream`, and the pod streams) its headers and a
        `PodStream` for the rest. Raises PodUnreachable or PodTimeout."""
        assert self._session is not None, "proxy not started"
        limits = limits or self._default
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
        if body and not any(k.lower() == "content-type" for k in sent):
            # Inference bodies are JSON; without this aiohttp says application/octet-stream,
            # which FastAPI-based model servers refuse with a 422.
            sent["Content-Type"] = "application/json"
        now = asyncio.get_running_loop().time()
        deadline = now + limits.timeout_s
        # The first byte is waited for within all three, as Knative's timeout handler does
        # (its idle timer runs from the request's start, reset by each write).
        first_by, which, seconds = min(
            (now + s, name, s) for name, s in (
                ("timeoutSeconds", limits.timeout_s),
                ("responseStartTimeoutSeconds", limits.response_start_timeout_s),
                ("idleTimeoutSeconds", limits.idle_timeout_s)) if s)
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout_at(first_by):
                resp = await self._session.request(method, base_url + path, data=body,
                                                   headers=sent)
            first_byte = time.time()
            content_type = resp.headers.get("content-type", "application/json")
            if stream and is_streamed(resp):
                answer = PodResponse(resp.status, b"", content_type, first_byte,
                                     PodStream(resp, deadline, limits))
                resp = None  # the stream's now
                return answer
            chunks = []
            while chunk := await _next_chunk(resp, deadline, limits):
                chunks.append(chunk)
            return PodResponse(resp.status, b"".join(chunks), content_type, first_byte)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError, aiohttp.ConnectionTimeoutError) as exc:
            # Refused, reset, closed before an answer, or never connected within the connect
            # timeout: the pod is gone or going (killed, stopping, wedged); the request was
            # not processed to an answer we could return, so another pod may take it (a
            # connect timeout is not the pod's 504: it never got the request).
            raise PodUnreachable(f"{base_url}: {exc}") from exc
        except TimeoutError:  # the first byte's (after: aiohttp's connect timeout is one too;
            # the body's are PodTimeout already)
            raise PodTimeout(which, seconds) from None
        finally:
            if resp is not None:  # read whole (pooled), or abandoned half way (closed)
                resp.release() if resp.content.at_eof() else resp.close()
