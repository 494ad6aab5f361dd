"""The activator's HTTP face: KServe v1 and Open Inference Protocol v2 paths. It decodes a
request for the handler (activator/handler.py: checks, path choice, error mapping) and
encodes its answer; health, metadata and metrics are answered here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from activator import openapi
from activator.errorpages import kserve_errors
from activator.handler import (
    Answer,
    Handler,
    Protocol,
    Request,
    error,
    not_found,
    stream_failure,
)
from kernel.config import ActivatorConfig
from kernel.errors import RemoteError
from kernel.metrics import SERVICE

log = logging.getLogger(__name__)

VERSION = "0.1.0"

HANDLER_KEY = web.AppKey("handler", Handler)


def build_app(handler: Handler, *, ready: ReadyCheck, bodies: BodyBudget | None = None,
              middlewares: Iterable[Middleware] = ()) -> web.Application:
    # KServe's error shape outermost, so an error page from any layer inside is JSON too.
    app = web.Application(client_max_size=handler.config.max_body_bytes,
                          middlewares=[kserve_errors, *middlewares])
    app[HANDLER_KEY] = handler
    app[READY_KEY] = ready
    app[BUDGET_KEY] = bodies or BodyBudget(handler.config.max_body_bytes_in_flight)
    app.add_routes(
        [
            web.get("/v2/health/live", live),
            web.get("/v2/health/ready", ready_probe),
            web.get("/v2", server_metadata),
            web.get("/v2/", server_metadata),
            web.get("/v2/models/{name}", model_metadata),
            web.get("/v2/models/{name}/ready", model_ready),
            web.post("/v2/models/{name}/infer", infer_v2),
            # The protocol's versioned paths (its OpenAPI document has only these for a
            # model): checked against the service's version, then forwarded as they came
            # where the pod serves them, else on the plain path (Handler._versioned).
            web.get("/v2/models/{name}/versions/{version}", model_metadata),
            web.get("/v2/models/{name}/versions/{version}/ready", model_ready),
            web.post("/v2/models/{name}/versions/{version}/infer", infer_v2),
            web.get("/v1/models/{name:[^/:]+}", model_ready),
            web.post("/v1/models/{name:[^/:]+}:predict", predict_v1),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi_document),
        ]
    )
    return app


class ReadyCheck:
    """Readiness tells the truth: ready only while connected to NATS (no endpoint sets
    arrive otherwise), and not once the activator is draining to stop."""

    def __init__(self, is_connected: Callable[[], bool]) -> None:
        self.is_connected = is_connected
        self.draining = False


READY_KEY = web.AppKey("ready", ReadyCheck)


class BodyBudget:
    """Bytes of request bodies held at once, across requests: what bounds the gateway's
    memory for bodies (16 bodies near 16 MiB at once took 1.5 GiB). A request that would
    pass the limit is answered 503 instead of being read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def lease(self) -> BodyLease:
        return BodyLease(self)


class BodyLease:
    """One request's share of the budget, grown as its body arrives, given back on exit."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def grow_to(self, size: int) -> bool:
        more = size - self.bytes
        if more <= 0:
            return True
        if self.budget.held + more > self.budget.limit:
            return False
        self.budget.held += more
        self.bytes = size
        return True

    def __enter__(self) -> BodyLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.budget.held -= self.bytes
        self.bytes = 0


BUDGET_KEY = web.AppKey("body_budget", BodyBudget)


def _headers(answer: Answer) -> dict[str, str]:
    headers = {"Content-Type": answer.content_type}
    if answer.pod:
        headers["X-Fnplane-Pod"] = answer.pod
    if answer.path:
        headers["X-Fnplane-Path"] = answer.path
    if answer.revision:
        headers["X-Fnplane-Revision"] = answer.revision
    if answer.retry_after_s:
        headers["Retry-After"] = str(answer.retry_after_s)
    return headers


def _http(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, headers=_headers(answer))


# How often a stream waiting on its pod looks whether its client is still there: aiohttp
# does not cancel a handler whose client left, and a pod between two tokens writes nothing
# that would fail.
CLIENT_CHECK_S = 0.2


async def send(request: web.Request, answer: Answer,
               broke: Callable[[Exception], bytes] | None = None) -> web.StreamResponse:
    """The answer to the client: whole, or chunk by chunk as the pod writes it. A client
    that leaves cuts the pod request and frees its slot at once; a stream the pod breaks
    off (or a timeout cuts) ends the connection without the closing chunk, after, for
    server-sent events, one `data:` event saying why (`broke`'s, from the failure)."""
    stream = answer.stream
    if stream is None:
        return _http(answer)
    resp = web.StreamResponse(status=answer.status, headers=_headers(answer))
    if answer.content_type.startswith("text/event-stream"):
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"  # proxies in front: do not hold events
    copy: asyncio.Future[None] | None = None
    try:
        await resp.prepare(request)

        async def pump() -> None:
            async for chunk in stream:
                await resp.write(chunk)
            await resp.write_eof()

        copy = asyncio.ensure_future(pump())
        while not copy.done():
            await asyncio.wait({copy}, timeout=CLIENT_CHECK_S)
            transport = request.transport
            if not copy.done() and (transport is None or transport.is_closing()):
                copy.cancel()
                stream.close("client_gone")
        try:
            await copy
        except asyncio.CancelledError:
            if stream.ended != "client_gone":
                raise
        except (ConnectionError, RuntimeError):  # the client left as we wrote
            stream.close("client_gone")
        except Exception as exc:  # the pod broke off, or a timeout cut it
            log.info("gateway: stream from %s ended early: %s", answer.pod, exc)
            if broke is not None and answer.content_type.startswith("text/event-stream"):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await resp.write(broke(exc))
            if request.transport is not None:
                request.transport.close()  # no closing chunk: the client sees it incomplete
        return resp
    finally:
        if copy is not None and not copy.done():  # the server cancelled us: the client left
            copy.cancel()
        stream.close("error")  # a no-op when it ended; else the slot is given back here


async def live(_request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready_probe(request: web.Request) -> web.Response:
    if request.app[READY_KEY].draining:
        return _http(error(503, "activator is shutting down"))
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
    version = request.match_info.get("version")
    handler = request.app[HANDLER_KEY]
    try:
        spec = await handler.lookup(name)
    except RemoteError as exc:
        return _http(error(503, f"cannot tell now whether model {name} exists: {exc.message}",
                           retry_after_s=handler.config.retry_after_s))
    if spec is None:
        return _http(not_found(name))
    if version is not None and version != spec.model_version:
        return _http(not_found(name, version))
    return web.json_response({"name": name, "ready": True})


async def model_metadata(request: web.Request) -> web.Response:
    return await _forward(request, None)


async def infer_v2(request: web.Request) -> web.Response:
    return await _forward(request, "v2")


async def predict_v1(request: web.Request) -> web.Response:
    return await _forward(request, "v1")


async def _forward(request: web.Request, protocol: Protocol | None) -> web.Response:
    handler = request.app[HANDLER_KEY]
    with request.app[BUDGET_KEY].lease() as lease:  # held until the answer is sent back
        body = b""
        if request.method == "POST":
            read = await _read_body(request, handler.config, lease)
            if isinstance(read, Answer):
                if read.status == 503:
                    handler.rejected.add(1, {SERVICE: request.match_info["name"],
                                             "reason": "body_budget"})
                return _http(read)
            body = read
        answer = await handler.handle(Request(
            service=request.match_info["name"], method=request.method, path=request.path_qs,
            body=body, headers=dict(request.headers), protocol=protocol,
            version=request.match_info.get("version"), stream=True,
        ))
        return await send(request, answer, broke=sse_error)


def sse_error(exc: Exception) -> bytes:
    """A server-sent event in KServe's error shape, for a stream cut after its start."""
    return b"data: " + stream_failure(exc).body + b"\n\n"


async def _read_body(request: web.Request, config: ActivatorConfig,
                     lease: BodyLease) -> bytes | Answer:
    """The body within its size, the budget of bodies in flight and the body timeout; or
    the answer saying which was passed. A declared length is checked before any byte is
    read; a chunked body as it arrives (decompressed: a small gzip cannot pass the limits)."""
    limit = config.max_body_bytes
    declared = request.content_length
    if declared is not None:
        if declared > limit:
            return _too_large(limit)
        if not lease.grow_to(declared):
            return _over_budget(config)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(config.body_timeout_s):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    return _too_large(limit)
                if not lease.grow_to(size):
                    return _over_budget(config)
                chunks.append(chunk)
    except TimeoutError:
        return error(408, f"request body not received within {config.body_timeout_s:g}s")
    except RequestPayloadError as exc:  # e.g. a body that is not what Content-Encoding says
        return error(400, f"unreadable request body: {exc.__cause__ or exc}")
    return b"".join(chunks)


# Built only when they answer: both were built for every request, a JSON encoding each
# (~7 µs a request; 5% of the gateway's samples in issue 11's profile under load).
def _too_large(limit: int) -> Answer:
    return error(413, f"request body larger than {limit} bytes")


def _over_budget(config: ActivatorConfig) -> Answer:
    return error(503, "the gateway holds as many request bodies as it may; retry",
                 retry_after_s=config.retry_after_s)
