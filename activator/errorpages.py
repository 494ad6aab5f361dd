"""aiohttp's own answers in KServe's error shape: a path no route matches (404), a method a
path does not take (405), a body over the limit (413) would otherwise be plain-text pages,
unlike every other error of the gateway and unlike what its OpenAPI document declares."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def kserve_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Keep what the client needs (Allow on a 405), drop the plain-text body's type.
        headers = {k: v for k, v in exc.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        return web.Response(status=exc.status, headers=headers,
                            body=json.dumps({"error": exc.reason}).encode(),
                            content_type="application/json")
