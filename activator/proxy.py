"""Forwarding one inference request to one pod. Distinguishes "the pod never got it"
(connection refused or reset before any answer: safe to send elsewhere) from "the pod got it
and failed" (must be reported, never silently replayed)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

# Headers worth carrying to the pod; hop-by-hop ones are the HTTP client's business.
FORWARD_HEADERS = ("content-type", "accept", "traceparent", "tracestate", "x-request-id")


class PodUnreachable(Exception):
    """The request did not reach the pod; it may be retried on another one."""


@dataclass(frozen=True)
class PodResponse:
    status: int
    body: bytes
    content_type: str
    first_byte_at: float


class Proxy:
    def __init__(self, *, timeout_s: float, connect_timeout_s: float = 2.0,
                 max_connections: int = 0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
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
        self, base_url: str, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> PodResponse:
        assert self._session is not None, "proxy not started"
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARD_HEADERS}
        if body and not any(k.lower() == "content-type" for k in sent):
            # Inference bodies are JSON; without this aiohttp says application/octet-stream,
            # which FastAPI-based model servers refuse with a 422.
            sent["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, base_url + path, data=body, headers=sent
            ) as resp:
                first_byte = time.time()
                data = await resp.read()
                return PodResponse(
                    resp.status,
                    data,
                    resp.headers.get("content-type", "application/json"),
                    first_byte,
                )
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError, aiohttp.ConnectionTimeoutError) as exc:
            # Refused, reset, closed before an answer, or never connected within the connect
            # timeout: the pod is gone or going (killed, stopping, wedged); the request was
            # not processed to an answer we could return, so another pod may take it (a
            # connect timeout is not the pod's 504: it never got the request).
            raise PodUnreachable(f"{base_url}: {exc}") from exc
