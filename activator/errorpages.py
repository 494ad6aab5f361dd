"""aiohttp's own answers in KServe's error shape: a path no route matches (404), a method a
path does not take (405), a body over the limit (413) would otherwise be plain-text pages,
unlike every other error of the gateway and unlike what its OpenAPI document declares. An
exception no handler caught would be aiohttp's plain-text 500 page: it is a JSON 500 too."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, headers=headers,
                        body=json.dumps({"error": message}).encode(),
                        content_type="application/json")


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
        message = exc.reason
        if exc.status in (404, 405):  # say what was asked, as the pod's 404s name the model
            message = f"{exc.reason}: {request.method} {request.path}"
        return _json_error(exc.status, message, headers)
    except Exception as exc:  # never aiohttp's plain-text 500 page
        log.exception("gateway: %s %s failed", request.method, request.path)
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}")
