"""The activator's HTTP face: KServe v1 and Open Inference Protocol v2 paths. It decodes a
request for the handler (activator/handler.py: checks, path choice, error mapping) and
encodes its answer; health, metadata and metrics are answered here."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from activator import openapi
from activator.errorpages import kserve_errors
from activator.handler import Answer, Handler, Protocol, Request, error

log = logging.getLogger(__name__)

VERSION = "0.1.0"

HANDLER_KEY = web.AppKey("handler", Handler)


def build_app(handler: Handler, *, ready: ReadyCheck) -> web.Application:
    app = web.Application(client_max_size=handler.config.max_body_bytes,
                          middlewares=[kserve_errors])
    app[HANDLER_KEY] = handler
    app[READY_KEY] = ready
    app.add_routes(
        [
            web.get("/v2/health/live", live),
            web.get("/v2/health/ready", ready_probe),
            web.get("/v2", server_metadata),
            web.get("/v2/models/{name}", model_metadata),
            web.get("/v2/models/{name}/ready", model_ready),
            web.post("/v2/models/{name}/infer", infer_v2),
            web.get("/v1/models/{name:[^/:]+}", model_ready),
            web.post("/v1/models/{name:[^/:]+}:predict", predict_v1),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi_document),
        ]
    )
    return app


class ReadyCheck:
    """Readiness tells the truth: ready only while connected to NATS (no endpoint sets
    arrive otherwise)."""

    def __init__(self, is_connected: Callable[[], bool]) -> None:
        self.is_connected = is_connected


READY_KEY = web.AppKey("ready", ReadyCheck)


def _http(answer: Answer) -> web.Response:
    headers = {"Content-Type": answer.content_type}
    if answer.pod:
        headers["X-Fnplane-Pod"] = answer.pod
    if answer.path:
        headers["X-Fnplane-Path"] = answer.path
    if answer.retry_after_s:
        headers["Retry-After"] = str(answer.retry_after_s)
    return web.Response(status=answer.status, body=answer.body, headers=headers)


async def live(_request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready_probe(request: web.Request) -> web.Response:
    if not request.app[READY_KEY].is_connected():
        return _http(error(503, "activator is not connected to NATS"))
    return web.json_response({"ready": True})


async def server_metadata(_request: web.Request) -> web.Response:
    return web.json_response({"name": "fnplane", "version": VERSION, "extensions": []})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[HANDLER_KEY].metrics.render(), content_type="text/plain")


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(
        version=VERSION, max_body_bytes=request.app[HANDLER_KEY].config.max_body_bytes))


async def model_ready(request: web.Request) -> web.Response:
    """Serverless readiness: a deployed service can serve, possibly after a cold start."""
    name = request.match_info["name"]
    if await request.app[HANDLER_KEY].lookup(name) is None:
        return _http(error(404, f"Model with name {name} does not exist."))
    return web.json_response({"name": name, "ready": True})


async def model_metadata(request: web.Request) -> web.Response:
    return await _forward(request, None)


async def infer_v2(request: web.Request) -> web.Response:
    return await _forward(request, "v2")


async def predict_v1(request: web.Request) -> web.Response:
    return await _forward(request, "v1")


async def _forward(request: web.Request, protocol: Protocol | None) -> web.Response:
    handler = request.app[HANDLER_KEY]
    body = b""
    if request.method == "POST":
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _http(error(413, f"request body larger than "
                                    f"{handler.config.max_body_bytes} bytes"))
        except RequestPayloadError as exc:  # e.g. a body that is not what Content-Encoding says
            return _http(error(400, f"unreadable request body: {exc.__cause__ or exc}"))
    answer = await handler.handle(Request(
        service=request.match_info["name"], method=request.method, path=request.path_qs,
        body=body, headers=dict(request.headers), protocol=protocol,
    ))
    return _http(answer)
