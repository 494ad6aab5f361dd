"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`) on its own port:
ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata and ModelInfer. Each model
call is converted to the REST request it stands for and sent through the same `Handler` as
HTTP (checks, buffer, scale from zero, direct mode, batching), after the same API-key gate;
its answer, or its error in KServe's shape, comes back as the protocol's message or as a gRPC
status whose details are the error's text (`Retry-After` in the trailing metadata)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import msgspec

from activator.handler import Answer, Handler, Request, error
from activator.ingress import VERSION, BodyBudget, ReadyCheck
from activator.oipgrpc import convert
from activator.oipgrpc import messages as m
from kernel import telemetry
from kernel.config import ActivatorConfig
from kernel.errors import RemoteError
from kernel.metrics import SERVICE
from kernel.procs import hostport

log = logging.getLogger(__name__)

# The REST status of an answer as the gRPC code a client of the protocol expects (KServe's
# and Triton's servers map their errors the same way).
GRPC_CODE: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Caller metadata carried to the pod, as HTTP headers are.
_FORWARDED = ("traceparent", "tracestate", "x-request-id")

# The API-key check every ingress makes (activator/keygate.py): None lets the call in.
Gate = Callable[[str, str | None], Awaitable[Answer | None]]


def grpc_code(status: int) -> grpc.StatusCode:
    if status in GRPC_CODE:
        return GRPC_CODE[status]
    return grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.UNKNOWN


def error_text(answer: Answer) -> str:
    """The `error` of KServe's shape, or the body as it came (a pod's own error page)."""
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return answer.body[:500].decode(errors="replace")
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    return answer.body[:500].decode(errors="replace")


class Abort(Exception):
    """An answer that is an error: becomes the call's status (raised inside a method)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


class GrpcIngress:
    def __init__(self, handler: Handler, ready: ReadyCheck, config: ActivatorConfig, *,
                 bodies: BodyBudget | None = None, gate: Gate | None = None) -> None:
        self.handler = handler
        self.ready = ready
        self.config = config
        self.bodies = bodies or BodyBudget(config.max_body_bytes_in_flight)
        self.gate = gate
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._calls = handler.metrics.counter("fnplane.activator.grpc.requests")

    @property
    def address(self) -> str:
        return hostport(self.config.host, self.port)

    async def start(self) -> None:
        cfg = self.config
        server = grpc.aio.server(options=[
            # Gateway workers share the port as they share the HTTP one.
            ("grpc.so_reuseport", 1 if cfg.workers > 1 else 0),
            ("grpc.max_receive_message_length", cfg.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ])
        unary = grpc.unary_unary_rpc_method_handler
        methods = {
            "ServerLive": (self.server_live, m.ServerLiveRequest, m.ServerLiveResponse),
            "ServerReady": (self.server_ready, m.ServerReadyRequest, m.ServerReadyResponse),
            "ServerMetadata": (self.server_metadata, m.ServerMetadataRequest,
                               m.ServerMetadataResponse),
            "ModelReady": (self.model_ready, m.ModelReadyRequest, m.ModelReadyResponse),
            "ModelMetadata": (self.model_metadata, m.ModelMetadataRequest,
                              m.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, m.ModelInferRequest, m.ModelInferResponse),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(m.SERVICE, {
            name: unary(self._guarded(name, fn), request_deserializer=req.FromString,
                        response_serializer=resp.SerializeToString)
            for name, (fn, req, resp) in methods.items()
        }),))
        self.port = server.add_insecure_port(hostport(cfg.host, cfg.grpc_port))
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Idempotent: refuse new calls, let those in flight finish within the drain bound."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=self.config.drain_timeout_s)

    def _guarded(self, name: str, fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
                 ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """An `Abort` becomes the call's status; anything unexpected an INTERNAL one with its
        cause, never a bare failure."""

        async def call(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
            try:
                return await fn(req, ctx)
            except Abort as exc:
                answer = exc.answer
            except convert.InvalidTensor as exc:
                answer = error(400, f"invalid request: {exc}")
            except Exception as exc:
                log.exception("%s: gRPC %s failed", self.handler.id, name)
                answer = error(500, f"internal error: {type(exc).__name__}: {exc}")
            self._calls.add(1, {"method": name, "status": str(answer.status)})
            trailing = (("retry-after", str(answer.retry_after_s)),) if answer.retry_after_s \
                else ()
            await ctx.abort(grpc_code(answer.status), error_text(answer), trailing)

        return call

    # ---- server-wide ----------------------------------------------------------------------

    async def server_live(self, _req: Any, _ctx: grpc.aio.ServicerContext) -> Any:
        return m.ServerLiveResponse(live=True)

    async def server_ready(self, _req: Any, _ctx: grpc.aio.ServicerContext) -> Any:
        """As the HTTP probe: ready only while connected to NATS and not draining."""
        return m.ServerReadyResponse(ready=not self.ready.draining and self.ready.is_connected())

    async def server_metadata(self, _req: Any, _ctx: grpc.aio.ServicerContext) -> Any:
        return m.ServerMetadataResponse(name="fnplane", version=VERSION)

    # ---- per model ------------------------------------------------------------------------

    async def model_ready(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        """Serverless readiness, as over HTTP: a deployed service (of that version) can serve,
        possibly after a cold start; an unknown one is not ready (Triton's answer), not an
        error."""
        await self._admit(req.name, ctx)
        try:
            spec = await self.handler.lookup(req.name)
        except RemoteError as exc:
            raise Abort(error(503, f"cannot tell now whether model {req.name} exists: "
                                   f"{exc.message}",
                              retry_after_s=self.handler.config.retry_after_s)) from None
        ready = spec is not None and req.version in ("", spec.model_version)
        self._calls.add(1, {"method": "ModelReady", "status": "200"})
        return m.ModelReadyResponse(ready=ready)

    async def model_metadata(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        answer = await self._send(ctx, "ModelMetadata", Request(
            service=req.name, method="GET", path=_model_path(req.name, req.version),
            headers=_headers(ctx), version=req.version or None))
        return convert.metadata_response(_json(answer))

    async def model_infer(self, req: Any, ctx: grpc.aio.ServicerContext) -> Any:
        name, version = req.model_name, req.model_version
        await self._admit(name, ctx)
        body = msgspec.json.encode(convert.infer_json(req))
        with self.bodies.lease() as lease:  # the same bound on bodies in flight as HTTP
            if not lease.grow_to(len(body)):
                self.handler.rejected.add(1, {SERVICE: name, "reason": "body_budget"})
                raise Abort(error(503, "the gateway holds as many request bodies as it may; "
                                       "retry", retry_after_s=self.handler.config.retry_after_s))
            headers = {**_headers(ctx), "content-type": "application/json"}
            answer = await self._send(ctx, "ModelInfer", Request(
                service=name, method="POST", path=_model_path(name, version) + "/infer",
                body=body, headers=headers, protocol="v2", version=version or None),
                admitted=True)
        return convert.infer_response(_json(answer), raw=bool(req.raw_input_contents))

    async def _admit(self, service: str, ctx: grpc.aio.ServicerContext) -> None:
        if self.gate is None:
            return
        refused = await self.gate(service, _metadata(ctx).get("authorization"))
        if refused is not None:
            raise Abort(refused)

    async def _send(self, ctx: grpc.aio.ServicerContext, method: str, req: Request, *,
                    admitted: bool = False) -> Answer:
        if not admitted:
            await self._admit(req.service, ctx)
        with telemetry.continue_trace(req.headers, f"{self.handler.id} gRPC {method}"):
            answer = await self.handler.handle(req)
        if not answer.ok:
            raise Abort(answer)
        self._calls.add(1, {"method": method, "status": str(answer.status)})
        return answer


def _model_path(name: str, version: str) -> str:
    return f"/v2/models/{name}/versions/{version}" if version else f"/v2/models/{name}"


def _metadata(ctx: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (ctx.invocation_metadata() or ())
            if isinstance(v, str)}


def _headers(ctx: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in _metadata(ctx).items() if k in _FORWARDED}


def _json(answer: Answer) -> dict[str, Any]:
    try:
        doc = json.loads(answer.body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise Abort(error(502, f"the model answered non-JSON: {answer.body[:200]!r}"))
    return doc
