"""One request, whatever door it came in by (HTTP, `svc.invoke`, `svc.events`): `handle`
checks it (unknown service → 404, bad input → 400, before anything can wake a service from
zero), chooses its path — micro-batch, direct to a pod (when `route` says there is spare
capacity), or through the buffer and throttler — and maps every failure to an answer in
KServe's error shape, in this one place. The ingresses only decode and encode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec

from activator.batcher import BatchAborted, BatcherClosed, MicroBatcher
from activator.direct import DirectPath
from activator.proxy import Limits, PodResponse, PodTimeout, PodUnreachable, Proxy
from activator.reporter import DemandReporter
from activator.revisions import RevisionPicker
from activator.services import ServiceTable
from activator.streaming import AnswerStream, Ended
from activator.throttler import BufferFull, ServiceGone, StartFailed, WaitTimeout
from kernel import telemetry
from kernel.config import ActivatorConfig
from kernel.errors import RemoteError
from kernel.messages import ServiceSpec
from kernel.metrics import SERVICE, LabelCache, Metrics, revision_labels

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
    # The revision chosen for it (a service with revisions), whose pods serve it, and
    # whether the split drew it (rather than a tag or a version naming it).
    revision: str = ""
    drawn: bool = False

    @property
    def target(self) -> str:
        """The name whose buffer, throttler and pods serve it: its revision, or the service."""
        return self.revision or self.service
    # The caller can pass a pod's answer on as it comes (SSE, chunked): the answer then
    # carries an AnswerStream the caller must close. False: answers are read whole.
    stream: bool = False


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    pod: str = ""
    path: str = ""  # activator | direct | activator-batch, for X-Fnplane-Path
    retry_after_s: int = 0
    cold: bool = False
    revision: str = ""  # for X-Fnplane-Revision
    stream: AnswerStream | None = None  # the body, as the pod writes it (body is then b"")

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


def stream_failure(exc: Exception) -> Answer:
    """How a stream that broke off after its start is reported, where the framing can still
    say it (an SSE event, the last NATS message): a timeout 504, anything else 502."""
    if isinstance(exc, PodTimeout):
        return error(504, f"the model's stream was cut by its {exc.which} ({exc.seconds:g}s)")
    return error(502, f"the stream from the model broke off: {exc}")


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
        self._first_byte = metrics.histogram("fnplane.serving.first_byte.duration")
        self._timeouts = metrics.counter("fnplane.serving.timeouts")
        self.rejected = metrics.counter("fnplane.activator.rejected")
        self._by_service = LabelCache(SERVICE)
        self._direct_attrs = LabelCache(SERVICE, path="direct")
        self.lookup = lookup
        self.id = log_id
        # Services whose pods answered a versioned path with NO_VERSIONED_PATHS: their
        # versioned requests go to the unversioned path at once (the version is checked here).
        self.unversioned: set[str] = set()
        self.revisions = RevisionPicker(table, metrics, log_id=log_id)
        table.make_batcher = self._batcher_for

    async def handle(self, req: Request) -> Answer:
        name = req.service
        try:
            spec = await self.lookup(name)
        except RemoteError as exc:
            return error(503, f"cannot tell now whether model {name} exists: {exc.message}",
                         retry_after_s=self.config.retry_after_s)
        if spec is None or spec.revision_of:  # a revision is reached through its service
            return not_found(name)
        asked = req
        if spec.revisions:
            chosen = await self._revision(req, spec)
            if isinstance(chosen, Answer):
                return chosen
            req = chosen
        elif req.version is not None and req.version != spec.model_version:
            return not_found(name, req.version)
        payload: Any = None  # decoded only for a batched service, which merges payloads
        if req.protocol is not None:
            problem = check_shape(req.protocol, req.body)
            svc = self.table.get(req.target)
            if problem is None and svc is not None and svc.batcher is not None:
                payload, problem = parse_body(req.body)
            if problem is not None:
                return error(400, problem)
        with telemetry.tracer.start_as_current_span(f"activator {name}") as span:
            headers = dict(req.headers)
            telemetry.inject(headers)
            try:
                answer = await self._versioned(req, payload, headers)
            except StartFailed as exc:
                # Drawn by the split for a revision whose pods turned out not to start:
                # its share falls to the others, this request's too (a tag or a version
                # asked for that revision, and gets its failure).
                again = await self._revision(asked, spec) if req.drawn else None
                if not isinstance(again, Request) or again.revision == req.revision:
                    return self._failure(name, exc)
                req = again
                try:
                    answer = await self._versioned(req, None, headers)
                except Exception as exc2:
                    return self._failure(name, exc2)
            except Exception as exc:
                return self._failure(name, exc)
            except asyncio.CancelledError:
                # The client left (the HTTP server cancels its handler): whatever it held —
                # a buffer place, a pod slot — was given back on the way out.
                self.rejected.add(1, revision_labels(req.target, reason="client_gone"))
                raise
            span.set_attribute("fnplane.path", answer.path)
            if req.revision:
                span.set_attribute("fnplane.revision", req.revision)
                answer = replace(answer, revision=req.revision)
            if answer.pod:
                span.set_attribute("fnplane.pod", answer.pod)
                span.set_attribute("fnplane.cold", answer.cold)
        return answer

    async def _revision(self, req: Request, spec: ServiceSpec) -> Request | Answer:
        """The revision that serves `req` (kernel/revisions.py decides), its spec known
        before anything wakes; a versioned path then names the revision's own version."""
        choice = self.revisions.choose(spec, req.headers, req.version)
        if choice.status:
            return error(choice.status, choice.message,
                         retry_after_s=self.config.retry_after_s if choice.status == 503 else 0)
        try:
            known = await self.lookup(choice.revision)
        except RemoteError as exc:
            return error(503, f"cannot tell now what revision {choice.revision} is: "
                              f"{exc.message}", retry_after_s=self.config.retry_after_s)
        if known is None:
            return error(503, f"revision {choice.revision} of {spec.name} is not known yet",
                         retry_after_s=self.config.retry_after_s)
        path = req.path
        if req.version is not None and choice.version != req.version:
            old = f"/v2/models/{req.service}/versions/{req.version}"
            path = f"/v2/models/{req.service}/versions/{choice.version}" + path[len(old):]
        return replace(req, revision=choice.revision, version=choice.version, path=path,
                       drawn=choice.drawn)

    async def _versioned(self, req: Request, payload: Any, headers: dict[str, str]) -> Answer:
        """A versioned request goes to the pod's versioned path if the pod serves it, else
        (learnt from its first answer, per service) to the unversioned one: the version was
        checked against the service's already, and a service's pods serve that one."""
        versioned = f"/v2/models/{req.service}/versions/{req.version}"
        if req.version is None or not req.path.startswith(versioned):  # KServe v1: no versions
            return await self._route(req, payload, headers)
        plain = replace(req, path=f"/v2/models/{req.service}" + req.path[len(versioned):])
        if req.target in self.unversioned:
            return await self._route(plain, payload, headers)
        answer = await self._route(req, payload, headers)
        if answer.status not in NO_VERSIONED_PATHS:
            return answer
        log.info("%s: pods of %s answered %d on %s; using unversioned paths", self.id,
                 req.service, answer.status, versioned)
        self.unversioned.add(req.target)
        return await self._route(plain, payload, headers)

    async def _route(self, req: Request, payload: Any, headers: dict[str, str]) -> Answer:
        svc = self.table.get(req.target)
        if svc is not None and svc.batcher is not None and payload is not None:
            status, body = await svc.batcher.submit(req.protocol, payload)
            return Answer(status, json.dumps(body).encode(), path="activator-batch")
        if svc is not None and svc.mode == "direct":
            answer = await self.forward_direct(req.target, req.method, req.path, req.body,
                                               headers, stream=req.stream)
            if answer is not None:
                return answer
        return await self.forward(req.target, req.method, req.path, req.body, headers,
                                  stream=req.stream)

    def _failure(self, name: str, exc: Exception) -> Answer:
        """Every failure of the request path, mapped to an answer once."""
        retry = self.config.retry_after_s
        match exc:
            case BufferFull():
                self.rejected.add(1, revision_labels(name, reason="buffer_full"))
                return error(503, str(exc), retry_after_s=retry)
            case WaitTimeout():
                self.rejected.add(1, revision_labels(name, reason="timeout"))
                return error(503, str(exc), retry_after_s=retry)
            case StartFailed():
                self.rejected.add(1, revision_labels(name, reason="start_failed"))
                return error(503, f"service {name} failed to start: {exc}", retry_after_s=retry)
            case ServiceGone() | BatcherClosed() | BatchAborted():
                return error(503, str(exc) or "service unavailable", retry_after_s=retry)
            case PodUnreachable():
                return error(502, f"pods of {name} unreachable: {exc}", retry_after_s=retry)
            case PodTimeout():
                self.timed_out(name, exc)
                return error(504, f"model {name} did not answer within its {exc.which} "
                                  f"({exc.seconds:g}s)")
            case _:  # never a bare 500 page: KServe's shape, and the cause
                log.error("%s: request to %s failed", self.id, name, exc_info=exc)
                return error(500, f"{type(exc).__name__}: {exc}")

    def timed_out(self, name: str, exc: PodTimeout) -> None:
        self._timeouts.add(1, revision_labels(name, timeout=exc.which))

    def _limits(self, name: str) -> Limits | None:
        svc = self.table.get(name)
        return Limits.of(svc.spec) if svc is not None else None

    def _streamed(self, name: str, resp: PodResponse, release: Callable[[], None],
                  done: Callable[[], None]) -> AnswerStream:
        """The pod's stream, giving back its slot (`release`) and recording the request
        (`done`) when it ends, however it ends."""
        assert resp.stream is not None

        def on_end(_how: Ended) -> None:
            release()
            done()

        return AnswerStream(resp.stream, on_end=on_end,
                            on_timeout=lambda exc: self.timed_out(name, exc))

    # ---- the paths ---------------------------------------------------------------------------

    async def forward_direct(
        self, name: str, method: str, path: str, body: bytes, headers: dict[str, str],
        *, stream: bool = False,
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

        def release() -> None:
            self.direct.release(name, target.pod)
            thr.dispatch()

        try:
            resp = await self.proxy.forward(target.url, method, path, body, headers,
                                            limits=self._limits(name), stream=stream)
        except PodUnreachable:
            release()
            return None
        except BaseException:
            release()
            raise
        # Counted once answered: a pod that refused sends the request down the activator
        # path, which counts it there. Labelled by service (a revision's is its service's:
        # fnplane.route.revision.requests counts per revision).
        label = svc.spec.revision_of or name
        self._requests.add(label)
        self._direct.add(label)
        attrs = self._direct_attrs[label]
        self._first_byte.record(resp.first_byte_at - t0, attrs)

        def done() -> None:
            self._invocation.record(time.time() - t0, attrs)

        if resp.stream is not None:  # the slot is held until the stream ends
            return _answer(resp, target.pod, "direct", cold=False,
                           stream=self._streamed(name, resp, release, done))
        release()
        done()
        return _answer(resp, target.pod, "direct", cold=False)

    async def forward(
        self, name: str, method: str, path: str, body: bytes, headers: dict[str, str],
        *, stream: bool = False,
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
        label = svc.spec.revision_of or name
        attrs = self._by_service[label]
        self._requests.add(label)
        attempts = MAX_ATTEMPTS
        cold_any = False
        limits = self._limits(name)
        while True:
            if thr.would_wait():
                self.reporter.urgent(name)
            slot, cold = await thr.acquire(self.config.request_timeout_s)
            cold_any = cold_any or cold
            try:
                resp = await self.proxy.forward(slot.url, method, path, body, headers,
                                                limits=limits, stream=stream)
            except PodUnreachable as exc:
                thr.mark_dead(slot)  # before the release hands the slot to a waiter
                thr.release(slot)
                attempts -= 1
                log.warning("%s: %s unreachable (%s); %s", self.id, slot.pod, exc,
                            "retrying" if attempts else "giving up")
                if not attempts:
                    raise
                continue
            except BaseException:
                thr.release(slot)
                raise
            break
        if cold_any:
            self.reporter.cold_start(name, slot.endpoint, request_in, resp.first_byte_at)
        self._first_byte.record(resp.first_byte_at - request_in, attrs)

        def done() -> None:
            self._invocation.record(time.time() - request_in, attrs)

        if resp.stream is not None:  # the slot is held until the stream ends
            return _answer(resp, slot.pod, "activator", cold=cold_any,
                           stream=self._streamed(name, resp, lambda: thr.release(slot), done))
        thr.release(slot)
        done()
        return _answer(resp, slot.pod, "activator", cold=cold_any)

    def _batcher_for(self, spec: ServiceSpec) -> MicroBatcher | None:
        name = spec.name

        async def send(protocol: str, payload: dict) -> tuple[int, dict]:
            """One merged request takes one pod slot, through the same path as any other."""
            model = spec.revision_of or name  # a revision's pods answer to its service
            path = (f"/v2/models/{model}/infer" if protocol == "v2"
                    else f"/v1/models/{model}:predict")
            headers = {"content-type": "application/json"}
            answer = await self.forward(name, "POST", path, json.dumps(payload).encode(), headers)
            try:
                return answer.status, json.loads(answer.body)
            except ValueError:
                return 502, {"error": f"pod answered a batch with non-JSON: {answer.body[:200]!r}"}

        return MicroBatcher.for_spec(spec.batching, send)


def _answer(resp: PodResponse, pod: str, path: str, *, cold: bool,
            stream: AnswerStream | None = None) -> Answer:
    return Answer(resp.status, resp.body, resp.content_type, pod=pod, path=path, cold=cold,
                  stream=stream)
