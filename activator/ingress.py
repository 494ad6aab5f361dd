"""The activator's HTTP face: KServe v1 and Open Inference Protocol v2 paths, with KServe's
error shape (`{"error": "..."}`; 400 invalid input, 404 unknown model, 503 not available,
504 timed out). Input is checked here, before it can wake a service from zero."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from activator.batcher import BatchAborted, BatcherClosed
from activator.gateway import Gateway
from activator.proxy import PodUnreachable
from activator.throttler import BufferFull, ServiceGone, StartFailed, WaitTimeout
from kernel import telemetry

log = logging.getLogger(__name__)

VERSION = "0.1.0"

GATEWAY_KEY = web.AppKey("gateway", Gateway)


def error(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=gateway.config.max_body_bytes)
    app[GATEWAY_KEY] = gateway
    app.add_routes(
        [
            web.get("/v2/health/live", live),
            web.get("/v2/health/ready", ready),
            web.get("/v2", server_metadata),
            web.get("/v2/models/{name}", model_metadata),
            web.get("/v2/models/{name}/ready", model_ready),
            web.post("/v2/models/{name}/infer", infer_v2),
            web.get("/v1/models/{name:[^/:]+}", model_ready_v1),
            web.post("/v1/models/{name:[^/:]+}:predict", predict_v1),
            web.get("/metrics", metrics),
        ]
    )
    return app


async def live(_request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    if gw.bus is None or gw.bus.nc.is_closed:
        return error(503, "activator is not connected to NATS")
    return web.json_response({"ready": True})


async def server_metadata(_request: web.Request) -> web.Response:
    return web.json_response({"name": "fnplane", "version": VERSION, "extensions": []})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[GATEWAY_KEY].metrics.render(), content_type="text/plain")


async def _known(request: web.Request) -> str | web.Response:
    name = request.match_info["name"]
    if await request.app[GATEWAY_KEY].lookup(name) is None:
        return error(404, f"Model with name {name} does not exist.")
    return name


async def model_ready(request: web.Request) -> web.Response:
    """Serverless readiness: a deployed service can serve, possibly after a cold start."""
    name = await _known(request)
    if isinstance(name, web.Response):
        return name
    return web.json_response({"name": name, "ready": True})


async def model_ready_v1(request: web.Request) -> web.Response:
    return await model_ready(request)


async def model_metadata(request: web.Request) -> web.Response:
    return await _forward(request, check=None)


async def infer_v2(request: web.Request) -> web.Response:
    return await _forward(request, check=check_v2)


async def predict_v1(request: web.Request) -> web.Response:
    return await _forward(request, check=check_v1)


def check_v2(payload: Any) -> str | None:
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        return "invalid request: expected a JSON object with an 'inputs' list"
    if not payload["inputs"]:
        return "invalid request: 'inputs' is empty"
    return None


def check_v1(payload: Any) -> str | None:
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        return "invalid request: expected a JSON object with an 'instances' list"
    return None


async def _forward(request: web.Request, *, check) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    name = await _known(request)
    if isinstance(name, web.Response):
        return name
    body = b""
    payload: Any = None
    if request.method == "POST":
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(
                413, f"request body larger than {gw.config.max_body_bytes} bytes"
            )
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"invalid JSON body: {exc}")
        if check is not None and (problem := check(payload)):
            return error(400, problem)
    retry = {"Retry-After": str(gw.config.retry_after_s)}
    with telemetry.tracer.start_as_current_span(f"activator {name}") as span:
        headers = dict(request.headers)
        telemetry.inject(headers)
        try:
            batcher = gw.batcher(name) if request.method == "POST" else None
            if batcher is not None:
                protocol = "v2" if request.path.startswith("/v2/") else "v1"
                status, answer = await batcher.submit(protocol, payload)
                return web.json_response(answer, status=status,
                                         headers={"X-Fnplane-Path": "activator-batch"})
            served = None
            if gw.mode(name) == "direct":
                served = await gw.serve_direct(name, request.method, request.path_qs, body, headers)
            if served is None:
                served = await gw.serve(name, request.method, request.path_qs, body, headers)
        except BufferFull as exc:
            gw.metrics.inc("fnplane.activator.rejected", service=name, reason="buffer_full")
            return error(503, str(exc), headers=retry)
        except WaitTimeout as exc:
            gw.metrics.inc("fnplane.activator.rejected", service=name, reason="timeout")
            return error(503, str(exc), headers=retry)
        except StartFailed as exc:
            gw.metrics.inc("fnplane.activator.rejected", service=name, reason="start_failed")
            return error(503, f"service {name} failed to start: {exc}", headers=retry)
        except (ServiceGone, BatcherClosed, BatchAborted) as exc:
            return error(503, str(exc) or "service unavailable", headers=retry)
        except PodUnreachable as exc:
            return error(502, f"pods of {name} unreachable: {exc}", headers=retry)
        except TimeoutError:
            return error(504, f"model {name} did not answer in {gw.config.pod_timeout_s:g}s")
        except Exception as exc:  # never a bare 500 page: KServe's shape, and the cause
            log.exception("activator: request to %s failed", name)
            return error(500, f"{type(exc).__name__}: {exc}")
        path = "activator" if served.via_activator else "direct"
        span.set_attribute("fnplane.pod", served.pod)
        span.set_attribute("fnplane.path", path)
        span.set_attribute("fnplane.cold", served.cold)
    resp = served.response
    return web.Response(
        status=resp.status,
        body=resp.body,
        headers={
            "Content-Type": resp.content_type,
            "X-Fnplane-Pod": served.pod,
            "X-Fnplane-Path": path,
        },
    )
