"""One request, whatever door it came in by (HTTP, `svc.invoke`, `svc.events`): `handle`
checks it (unknown service → 404, bad input → 400, before anything can wake a service from
zero), chooses its path — micro-batch, direct to a pod (when `route` says there is spare
capacity), or through the buffer and throttler — and maps every failure to an answer in
KServe's error shape, in this one place. The ingresses only decode and encode.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec

from activator.batcher import BatchAborted, BatcherClosed, MicroBatcher
from activator.direct import DirectPath
from activator.proxy import PodResponse, PodUnreachable, Proxy
from activator.reporter import DemandReporter
from activator.services import ServiceTable
from activator.throttler import BufferFull, ServiceGone, StartFailed, WaitTimeout
from kernel import telemetry
from kernel.config import ActivatorConfig
from kernel.errors import RemoteError
from kernel.messages import ServiceSpec
from kernel.metrics import SERVICE, LabelCache, Metrics

log = logging.getLogger(__name__)
# Pods tried for one request: each that is gone is marked dead, so this bounds a request's
# tries when many die at once, not a flapping pod's.
MAX_ATTEMPTS = 10

Protocol = Literal["v1", "v2"]
RETRYABLE_4XX = frozenset({408, 429})
# A pod's answer to a versioned OIP path that says it does not serve versioned paths at all
# (KServe's Python server declares them but answers 501 "Model versioning not supported yet";
# a plain FastAPI app has no such route, 404): nothing ran, so the unversioned path is tried.
NO_VERSIONED_PATHS = frozenset({404, 501})
Lookup = Callable[[str], Awaitable[ServiceSpec | None]]


@dataclass(frozen=True)
class Request:
    """`protocol` says which body check applies (None: a GET with no body to check);
    `version` is the model version a versioned OIP path (or NATS header) names, checked
    against the service's before anything wakes (None: whatever the service serves)."""

    service: str
    method: str
    path: str  # on the pod, with the query string
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    protocol: Protocol | None = None
    version: str | None = None


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    pod: str = ""
    path: str = ""  # activator | direct | activator-batch, for X-Fnplane-Path
    retry_after_s: int = 0
    cold: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """A later try may succeed: 5xx, or a pod's 408/429 (KServe: 503 not ready)."""
        return self.status >= 500 or self.status in RETRYABLE_4XX


def error(status: int, message: str, *, retry_after_s: int = 0) -> Answer:
    """KServe's error shape: `{"error": "..."}`."""
    return Answer(status, json.dumps({"error": message}).encode(), retry_after_s=retry_after_s)


def not_found(name: str, version: str | None = None) -> Answer:
    """KServe's 404 for an unknown model (and, with a version, for an unknown version)."""
    of = f" and version {version}" if version is not None else ""
    return error(404, f"Model with name {name}{of} does not exist.")


class _Tensor(msgspec.Struct):
    """One input, per the protocol's `request_input`: typed fields, `data` kept raw."""

    name: str
    shape: list[int]
    datatype: str
    data: msgspec.Raw
    parameters: dict[str, msgspec.Raw] | None = None


class _Wanted(msgspec.Struct):
    name: str
    parameters: dict[str, msgspec.Raw] | None = None


class _V2Shape(msgspec.Struct):
    inputs: list[_Tensor]
    id: str | None = None
    parameters: dict[str, msgspec.Raw] | None = None
    outputs: list[_Wanted] | None = None


class _V1Shape(msgspec.Struct):
    instances: list[msgspec.Raw]


_SHAPES = {"v2": msgspec.json.Decoder(_V2Shape), "v1": msgspec.json.Decoder(_V1Shape)}


def check_shape(protocol: Protocol, body: bytes) -> str | None:
    """The protocol's types on the raw body, without building its tensors: msgspec validates
    the whole document (each input's name, shape, datatype and parameters typed) but keeps
    each input's data as raw bytes, so a 16 MiB body costs no Python floats (full decoding
    took ~64 MiB of objects and ~0.4 s of event loop per such body, and a thread does not
    help: msgspec holds the GIL while it decodes). That data is an array is checked on its
    first byte; what its elements are is the model's business (a 400 from the pod)."""
    try:
        shape = _SHAPES[protocol].decode(body)
    except msgspec.ValidationError as exc:  # valid JSON, wrong shape: msgspec says where
        return f"invalid request: {exc}"
    except msgspec.DecodeError as exc:
        return f"invalid JSON body: {exc}"
    except RecursionError:
        return "invalid JSON body: nested too deeply"
    if not body.isascii():  # raw inputs skip the UTF-8 check full decoding makes
        try:
            body.decode()
        except UnicodeDecodeError:
            return "invalid JSON body: Invalid UTF-8 encoded string"
    if isinstance(shape, _V2Shape):
        if not shape.inputs:
            return "invalid request: 'inputs' is empty"
        for i, tensor in enumerate(shape.inputs):
            if bytes(memoryview(tensor.data)[:1]) != b"[":
                return f"invalid request: inputs[{i}].data must be an array"
    return None


def parse_body(body: bytes) -> tuple[Any, str | None]:
    """The JSON body, or why it is not one. msgspec, not `json`: it is faster and bounds
    nesting (a hundred thousand `[` is a 400, not a crash of the request path)."""
    try:
        return msgspec.json.decode(body), None
    except msgspec.DecodeError as exc:
        return None, f"invalid JSON body: {exc}"
    except RecursionError:
        return None, "invalid JSON body: nested too deeply"


class Handler:
    def __init__(
        self,
        config: ActivatorConfig,
        table: ServiceTable,
        proxy: Proxy,
        direct: DirectPath,
        reporter: DemandReporter,
        metrics: Metrics,
        *,
        lookup: Lookup,
        log_id: str,
    ) -> None:
        self.config = config
        self.table = table
        self.proxy = proxy
        self.direct = direct
        self.reporter = reporter
        self.metrics = metrics
        # Instruments and attribute sets made once: recording on the request path is then
        # one SDK call with a cached mapping.
        self._requests = metrics.hot_counter("fnplane.revision.requests", SERVICE)
        self._direct = metrics.hot_counter("fnplane.gateway.direct.requests", SERVICE)
        self._invocation = metrics.histogram("fnplane.serving.invocation.duration")
        self.rejected = metrics.counter("fnplane.activator.rejected")
        self._by_service = LabelCache(SERVICE)
        self._direct_attrs = LabelCache(SERVICE, path="direct")
        self.lookup = lookup
        self.id = log_id
        # Services whose pods answered a versioned path with NO_VERSIONED_PATHS: their
        # versioned requests go to the unversioned path at once (the version is checked here).
        self.unversioned: set[str] = set()
        table.make_batcher = self._batcher_for

    async def handle(self, req: Request) -> Answer:
        name = req.service
        try:
            spec = await self.lookup(name)
        except RemoteError as exc:
            return error(503, f"cannot tell now whether model {name} exists: {exc.message}",
                         retry_after_s=self.config.retry_after_s)
        if spec is None:
            return not_found(name)
        if req.version is not None and req.version != spec.model_version:
            return not_found(name, req.version)
        payload: Any = None  # decoded only for a batched service, which merges payloads
        if req.protocol is not None:
            problem = check_shape(req.protocol, req.body)
            svc = self.table.get(name)
            if problem is None and svc is not None and svc.batcher is not None:
                payload, problem = parse_body(req.body)
            if problem is not None:
                return error(400, problem)
        with telemetry.tracer.start_as_current_span(f"activator {name}") as span:
            headers = dict(req.headers)
            telemetry.inject(headers)
            try:
                answer = await self._versioned(req, payload, headers)
            except Exception as exc:
                return self._failure(name, exc)
            span.set_attribute("fnplane.path", answer.path)
            if answer.pod:
                span.set_attribute("fnplane.pod", answer.pod)
                span.set_attribute("fnplane.cold", answer.cold)
        return answer

    async def _versioned(self, req: Request, payload: Any, headers: dict[str, str]) -> Answer:
        """A versioned request goes to the pod's versioned path if the pod serves it, else
        (learnt from its first answer, per service) to the unversioned one: the version was
        checked against the service's already, and a service's pods serve that one."""
        versioned = f"/v2/models/{req.service}/versions/{req.version}"
        if req.version is None or not req.path.startswith(versioned):  # KServe v1: no versions
            return await self._route(req, payload, headers)
        plain = replace(req, path=f"/v2/models/{req.service}" + req.path[len(versioned):])
        if req.service in self.unversioned:
            return await self._route(plain, payload, headers)
        answer = await self._route(req, payload, headers)
        if answer.status not in NO_VERSIONED_PATHS:
            return answer
        log.info("%s: pods of %s answered %d on %s; using unversioned paths", self.id,
                 req.service, answer.status, versioned)
        self.unversioned.add(req.service)
        return await self._route(plain, payload, headers)

    async def _route(self, req: Request, payload: Any, headers: dict[str, str]) -> Answer:
        svc = self.table.get(req.service)
        if svc is not None and svc.batcher is not None and payload is not None:
            status, body = await svc.batcher.submit(req.protocol, payload)
            return Answer(status, json.dumps(body).encode(), path="activator-batch")
        if svc is not None and svc.mode == "direct":
            answer = await self.forward_direct(req.service, req.method, req.path, req.body,
                                               headers)
            if answer is not None:
                return answer
        return await self.forward(req.service, req.method, req.path, req.body, headers)

    def _failure(self, name: str, exc: Exception) -> Answer:
        """Every failure of the request path, mapped to an answer once."""
        retry = self.config.retry_after_s
        match exc:
            case BufferFull():
                self.rejected.add(1, {SERVICE: name, "reason": "buffer_full"})
                return error(503, str(exc), retry_after_s=retry)
            case WaitTimeout():
                self.rejected.add(1, {SERVICE: name, "reason": "timeout"})
                return error(503, str(exc), retry_after_s=retry)
            case StartFailed():
                self.rejected.add(1, {SERVICE: name, "reason": "start_failed"})
                return error(503, f"service {name} failed to start: {exc}", retry_after_s=retry)
            case ServiceGone() | BatcherClosed() | BatchAborted():
                return error(503, str(exc) or "service unavailable", retry_after_s=retry)
            case PodUnreachable():
                return error(502, f"pods of {name} unreachable: {exc}", retry_after_s=retry)
            case TimeoutError():
                return error(504, f"model {name} did not answer in {self.config.pod_timeout_s:g}s")
            case _:  # never a bare 500 page: KServe's shape, and the cause
                log.error("%s: request to %s failed", self.id, name, exc_info=exc)
                return error(500, f"{type(exc).__name__}: {exc}")

    # ---- the paths ---------------------------------------------------------------------------

    async def forward_direct(
        self, name: str, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Answer | None:
        """Straight to a pod, bypassing buffer and throttler; None when no pod has a free
        slot (or it refused the connection), so the caller takes the activator path."""
        svc = self.table.get(name)
        if svc is None or svc.endpoints is None or svc.mode != "direct":
            return None
        thr = svc.throttler
        target = self.direct.try_acquire(name, svc.endpoints.endpoints,
                                         svc.spec.container_concurrency, thr.busy())
        if target is None:
            return None
        t0 = time.time()
        thr.admitted += 1
        try:
            resp = await self.proxy.forward(target.url, method, path, body, headers)
        except PodUnreachable:
            return None
        finally:
            self.direct.release(name, target.pod)
            thr.dispatch()
        took = time.time() - t0
        # Counted once answered: a pod that refused sends the request down the activator
        # path, which counts it there.
        self._requests.add(name)
        self._direct.add(name)
        self._invocation.record(took, self._direct_attrs[name])
        return _answer(resp, target.pod, "direct", cold=False)

    async def forward(
        self, name: str, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Answer:
        """Admit, wait for a pod if needed, forward; a pod that is gone (refused, reset or
        closed before answering) is marked dead and the request goes to another, or waits for
        one — pods that die together (their node agent killed) must not fail it. Raises the
        throttler's errors for `_failure`."""
        svc = self.table.get(name)
        if svc is None:
            raise ServiceGone(f"service {name!r} was deleted")
        thr = svc.throttler
        request_in = time.time()
        attrs = self._by_service[name]
        self._requests.add(name)
        attempts = MAX_ATTEMPTS
        cold_any = False
        while True:
            if thr.would_wait():
                self.reporter.urgent(name)
            slot, cold = await thr.acquire(self.config.request_timeout_s)
            cold_any = cold_any or cold
            try:
                resp = await self.proxy.forward(slot.url, method, path, body, headers)
            except PodUnreachable as exc:
                thr.mark_dead(slot)
                attempts -= 1
                log.warning("%s: %s unreachable (%s); %s", self.id, slot.pod, exc,
                            "retrying" if attempts else "giving up")
                if not attempts:
                    raise
                continue
            finally:
                thr.release(slot)
            break
        if cold_any:
            self.reporter.cold_start(name, slot.endpoint, request_in, resp.first_byte_at)
        self._invocation.record(time.time() - request_in, attrs)
        return _answer(resp, slot.pod, "activator", cold=cold_any)

    def _batcher_for(self, spec: ServiceSpec) -> MicroBatcher | None:
        name = spec.name

        async def send(protocol: str, payload: dict) -> tuple[int, dict]:
            """One merged request takes one pod slot, through the same path as any other."""
            path = f"/v2/models/{name}/infer" if protocol == "v2" else f"/v1/models/{name}:predict"
            headers = {"content-type": "application/json"}
            answer = await self.forward(name, "POST", path, json.dumps(payload).encode(), headers)
            try:
                return answer.status, json.loads(answer.body)
            except ValueError:
                return 502, {"error": f"pod answered a batch with non-JSON: {answer.body[:200]!r}"}

        return MicroBatcher.for_spec(spec.batching, send)


def _answer(resp: PodResponse, pod: str, path: str, *, cold: bool) -> Answer:
    return Answer(resp.status, resp.body, resp.content_type, pod=pod, path=path, cold=cold)
