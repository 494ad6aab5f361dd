"""The gateway's front door (issue 19): with API keys on, every model request, at every
ingress (HTTP `Authorization: Bearer`, gRPC `authorization` metadata, an `Authorization`
header on `svc.invoke` / `svc.events`), passes `KeyGate.admit` before the request handler:
401 for no key, an unknown or a revoked one, 403 for another service's key, 429 with
Retry-After over the key's rate limit, all in KServe's error shape. The verdict is
kernel/apikeys.py's and the bucket kernel/tokenbucket.py's; this module only fetches what they
decide on: key records from Redis (cached for a bounded time; a revocation evicts at once) and
the key's bucket, shared in Redis by every worker and activator. Counted per key id, never
per key."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.exceptions
from aiohttp import web
from aiohttp.typedefs import Handler as AioHandler
from aiohttp.typedefs import Middleware

from activator.handler import Answer, error
from kernel.apikeys import bearer, parse, verdict
from kernel.messages import StoredKey
from kernel.metrics import SERVICE, Metrics
from kernel.store import Store
from kernel.tokenbucket import retry_after_s

log = logging.getLogger(__name__)

# Key records a gateway caches at most (misses too: ids a caller makes up must not grow it
# without bound); the oldest entry goes first.
MAX_CACHED = 10_000


class KeyGate:
    def __init__(self, store: Store, metrics: Metrics, *, cache_ttl_s: float,
                 retry_after: int, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cache_ttl_s = cache_ttl_s
        self.retry_after = retry_after
        self._clock = clock  # cache staleness
        self._wall = wall  # bucket time: shared with other processes through Redis
        self._cache: dict[str, tuple[float, StoredKey | None]] = {}
        self._counted = metrics.counter("fnplane.gateway.key.requests")

    async def admit(self, service: str, authorization: str | None) -> Answer | None:
        """None lets the request in; otherwise the answer refusing it."""
        token = bearer(authorization)
        parsed = parse(token) if token is not None else None
        stored: StoredKey | None = None
        try:
            if parsed is not None:
                stored = await self._lookup(parsed[0])
            v = verdict(token, stored, service)
            if not v.ok:
                self._count(v.key_id, service, v.reason)
                return error(v.status, v.message)
            assert stored is not None
            key = stored.key
            if key.rps > 0:
                wait = await self.store.take_token(key.id, rps=key.rps, burst=key.burst,
                                                   now=self._wall())
                if wait > 0:
                    self._count(key.id, service, "rate_limited")
                    return error(429, f"API key {key.id} is over its rate limit of "
                                      f"{key.rps:g} requests/s", retry_after_s=retry_after_s(wait))
        except (redis.exceptions.RedisError, OSError) as exc:
            # Closed, not open: a gateway that cannot check a key lets nobody in on it.
            log.warning("key gate: cannot check an API key for %s: %s", service, exc)
            self._count("", service, "unchecked")
            return error(503, "cannot check the API key now", retry_after_s=self.retry_after)
        self._count(key.id, service, "ok")
        return None

    async def service_of(self, authorization: str | None) -> str | None:
        """The service a valid key in force is for (None: no such key), without taking a
        token: for listings (OpenAI's model list), which serve no model."""
        token = bearer(authorization)
        parsed = parse(token) if token is not None else None
        if parsed is None:
            return None
        try:
            stored = await self._lookup(parsed[0])
        except (redis.exceptions.RedisError, OSError):
            return None
        if stored is None or not verdict(token, stored, stored.key.service).ok:
            return None
        return stored.key.service

    def forget(self, key_id: str) -> None:
        """A revoked key: read it again on its next use."""
        self._cache.pop(key_id, None)

    async def _lookup(self, key_id: str) -> StoredKey | None:
        now = self._clock()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < self.cache_ttl_s:
            return hit[1]
        stored = await self.store.get_key(key_id)
        self._cache.pop(key_id, None)
        if len(self._cache) >= MAX_CACHED:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key_id] = (now, stored)
        return stored

    def _count(self, key_id: str, service: str, outcome: str) -> None:
        self._counted.add(1, {"key": key_id or "none", SERVICE: service, "outcome": outcome})

    # ---- the HTTP door --------------------------------------------------------------------

    def middleware(self) -> Middleware:
        """Every route that names a model (`{name}` in its path) passes the gate first;
        health, metadata of the server, /metrics and /openapi.json do not. A route whose
        model is in its body (OpenAI's `model`) must call `admit` itself once it has read it."""

        @web.middleware
        async def gate(request: web.Request, handler: AioHandler) -> web.StreamResponse:
            name = request.match_info.get("name")
            if name is None:
                return await handler(request)
            refused = await self.admit(name, request.headers.get("Authorization"))
            if refused is None:
                return await handler(request)
            headers = {"Content-Type": refused.content_type}
            if refused.retry_after_s:
                headers["Retry-After"] = str(refused.retry_after_s)
            if refused.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="fnplane"'
            return web.Response(status=refused.status, body=refused.body, headers=headers)

        return gate
