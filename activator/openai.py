"""OpenAI-compatible routes, as KServe exposes them (`/openai/v1/...`): the body's `model`
names the service, and the request goes to the pod's own OpenAI path unchanged — vLLM's and
TGI's `/v1/...`, or, for a pod that answers 404 there (KServe's Hugging Face server),
`/openai/v1/...`, learnt per service. Streamed completions (`"stream": true`) flow through
as server-sent events. Errors on these routes are in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, which the `openai` client reads."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from activator.handler import Answer, Request, error, parse_body, stream_failure
from activator.ingress import (
    BUDGET_KEY,
    HANDLER_KEY,
    _read_body,
    send,
)

if TYPE_CHECKING:  # imported only when keys are on (activator/server.py)
    from activator.keygate import KeyGate

PREFIX = "/openai"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# OpenAI's error types by status (its API reference, "Error codes").
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 408: "timeout", 409: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 504: "timeout"}
_CODES = {404: "model_not_found", 504: "timeout"}
# Services whose pods serve the OpenAI paths under KServe's `/openai` prefix.
KSERVE_STYLE_KEY = web.AppKey("openai_kserve_style", set)


# The API-key check (activator/keygate.py) with keys on: these routes name their model in
# the body, which the gate's middleware cannot see, so they call it once they have read it.
GATE_KEY: web.AppKey[KeyGate | None] = web.AppKey("openai_gate")


def add_routes(app: web.Application, gate: KeyGate | None = None) -> None:
    app[KSERVE_STYLE_KEY] = set()
    app[GATE_KEY] = gate
    app.add_routes([web.post(PREFIX + path, completions) for path in ROUTES]
                   + [web.get(PREFIX + "/v1/models", models)])


def openai_error(status: int, message: str, *, retry_after_s: int = 0) -> Answer:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None,
                      "code": _CODES.get(status)}}
    return Answer(status, json.dumps(body).encode(), retry_after_s=retry_after_s)


def in_openai_shape(answer: Answer) -> Answer:
    """The gateway's KServe-shaped errors (`{"error": "..."}`) said OpenAI's way; a pod's own
    OpenAI error (an object under `error`) and every success pass unchanged."""
    if answer.status < 400 or answer.stream is not None:
        return answer
    try:
        doc: Any = json.loads(answer.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return answer
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        message = doc["error"]  # KServe's shape: the gateway's, or a KServe pod's
    elif isinstance(doc, dict) and isinstance(doc.get("message"), str):
        message = doc["message"]  # vLLM's ErrorResponse, flat
    else:
        message = answer.body.decode(errors="replace")[:500]
    shaped = openai_error(answer.status, message, retry_after_s=answer.retry_after_s)
    return Answer(shaped.status, shaped.body, pod=answer.pod, path=answer.path,
                  retry_after_s=answer.retry_after_s)


def sse_error(exc: Exception) -> bytes:
    """A stream cut after its start: one last event the `openai` client raises as an error."""
    return b"data: " + in_openai_shape(stream_failure(exc)).body + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    handler = request.app[HANDLER_KEY]
    with request.app[BUDGET_KEY].lease() as lease:
        read = await _read_body(request, handler.config, lease)
        if isinstance(read, Answer):
            return await send(request, in_openai_shape(read))
        payload, problem = parse_body(read)
        model = payload.get("model") if isinstance(payload, dict) else None
        if problem is None and not (isinstance(model, str) and model):
            problem = "you must provide a model parameter"
        if problem is not None:
            return await send(request, in_openai_shape(error(400, problem)))
        gate = request.app[GATE_KEY]
        if gate is not None:
            refused = await gate.admit(model, request.headers.get("Authorization"))
            if refused is not None:
                return await send(request, in_openai_shape(refused))
        path = request.path[len(PREFIX):]
        kserve_style = request.app[KSERVE_STYLE_KEY]
        req = Request(service=model, method="POST",
                      path=(PREFIX + path) if model in kserve_style else path, body=read,
                      headers=dict(request.headers), stream=True)
        answer = await handler.handle(req)
        if answer.status == 404 and answer.pod and model not in kserve_style:
            # A pod said it has no `/v1/...`: KServe's server has them under `/openai`.
            kserve_style.add(model)
            answer = await handler.handle(Request(
                service=model, method="POST", path=PREFIX + path, body=read,
                headers=dict(request.headers), stream=True))
        return await send(request, in_openai_shape(answer), broke=sse_error)


async def models(request: web.Request) -> web.Response:
    """The deployed services, as OpenAI's model list: none is woken to answer. With API
    keys on, a caller sees only the service its key is for (no key: 401)."""
    table = request.app[HANDLER_KEY].table
    names = sorted(table.names())
    gate = request.app[GATE_KEY]
    if gate is not None:
        mine = await gate.service_of(request.headers.get("Authorization"))
        if mine is None:
            return await send(request, openai_error(401, "a valid API key is required"))
        names = [n for n in names if n == mine]
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "fnplane"}
            for name in names]
    return web.json_response({"object": "list", "data": data})
