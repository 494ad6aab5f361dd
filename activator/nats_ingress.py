"""The activator's NATS face (DESIGN.md, cold request step 1; issue 4). Request-reply on
`svc.invoke.{service}` answers exactly as the HTTP ingress does, through the same request
handler (batching, direct mode, buffer, scale from zero), with KServe's error shape and the
status in the `Fnplane-Status` header. Fire-and-forget events on `svc.events.{service}` are
`nats_events`' business; this component owns the connection both share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from activator.handler import (
    Answer,
    Handler,
    Protocol,
    Request,
    error,
    parse_body,
    stream_failure,
)
from activator.nats_events import EventStreams
from activator.nats_stream import CHUNK, END, HEAD, SEQ_HEADER, STREAM_HEADER, wants_stream
from kernel import endpoints as ep
from kernel import telemetry
from kernel.bus import Bus
from kernel.config import NatsIngressConfig
from kernel.messages import ServiceDeleted, SpecUpdated
from kernel.metrics import SERVICE, STATUS_CODE

log = logging.getLogger(__name__)

STATUS_HEADER = "Fnplane-Status"
# The NATS twin of OIP's `/versions/{v}` path segment: a request that names a version is
# answered 404 unless the service serves that version, as over HTTP.
VERSION_HEADER = "Fnplane-Model-Version"
_FORWARDED = ("x-request-id", "tracestate", "fnplane-tag", "x-fnplane-tag")
# The API-key check (activator/keygate.py): service, Authorization header → None to let in.
Gate = Callable[[str, str | None], Awaitable[Answer | None]]


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A NATS header by name, case-insensitive as HTTP's."""
    return next((v for k, v in (headers or {}).items() if k.lower() == name.lower()), None)


def nats_headers(answer: Answer) -> dict[str, str]:
    headers = {STATUS_HEADER: str(answer.status), "Content-Type": answer.content_type}
    if answer.pod:
        headers["Fnplane-Pod"] = answer.pod
    if answer.path:
        headers["Fnplane-Path"] = answer.path  # activator | direct | activator-batch
    if answer.revision:
        headers["Fnplane-Revision"] = answer.revision
    if answer.retry_after_s:
        headers["Retry-After"] = str(answer.retry_after_s)
    return headers


def request_for(name: str, body: bytes, headers: Mapping[str, str] | None,
                *, stream: bool = False) -> Request | Answer:
    """A NATS body as the handler's request: its protocol by its shape (OIP v2 `inputs`,
    KServe v1 `instances`), or the 400 that keeps bad input from waking the service. A
    `Fnplane-Model-Version` header pins the version; an OIP body then goes to the pod's
    versioned path, as it would over HTTP."""
    payload, problem = parse_body(body)
    if problem is not None:
        return error(400, problem)
    version = next((v for k, v in (headers or {}).items() if k.lower() == VERSION_HEADER.lower()),
                   None) or None  # an empty header names no version
    protocol: Protocol
    if isinstance(payload, dict) and "inputs" in payload:
        protocol, path = "v2", (f"/v2/models/{name}/versions/{version}/infer" if version
                                else f"/v2/models/{name}/infer")
    elif isinstance(payload, dict) and "instances" in payload:
        protocol, path = "v1", f"/v1/models/{name}:predict"
    else:
        return error(400, "invalid request: expected a JSON object with an 'inputs' list (Open"
                          " Inference Protocol v2) or an 'instances' list (KServe v1)")
    forwarded = {"Content-Type": "application/json"}
    forwarded.update({k: v for k, v in (headers or {}).items() if k.lower() in _FORWARDED})
    return Request(service=name, method="POST", path=path, body=body, headers=forwarded,
                   protocol=protocol, version=version, stream=stream)


async def invoke(handler: Handler, name: str, body: bytes,
                 headers: Mapping[str, str] | None, *, stream: bool = False) -> Answer:
    """One inference through the handler: the same checks, paths and errors as HTTP.
    `stream`: a streamed answer may come back with its AnswerStream (the caller closes it)."""
    req = request_for(name, body, headers, stream=stream)
    return req if isinstance(req, Answer) else await handler.handle(req)


# ---- the component ----------------------------------------------------------------------


class NatsIngress:
    """Uses the activator's connection; stopping it ends its own work, not the connection."""

    def __init__(self, handler: Handler, bus: Bus, config: NatsIngressConfig) -> None:
        self.handler = handler
        self.bus = bus
        self.config = config
        self.events: EventStreams | None = None  # None while JetStream is unavailable
        self.gate: Gate | None = None  # API keys on: both svc.invoke and svc.events pass it
        self._sub: Subscription | None = None
        self._requests: set[asyncio.Task[None]] = set()
        self._stopped = False

    async def start(self) -> None:
        bus = self.bus
        await bus.serve(ep.SERVICE_UPDATED, self._on_spec_updated)
        await bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        # Client bodies are JSON, not fnplane messages: a raw subscription.
        self._sub = await bus.nc.subscribe(
            ep.INVOKE.pattern, queue=self.config.queue_group, cb=self._on_invoke
        )
        js = bus.nc.jetstream(timeout=2.0)
        try:
            await js.account_info()
        except (nats.errors.Error, OSError) as exc:
            log.warning("%s: JetStream unavailable (%s): no events ingress", self.handler.id, exc)
            return
        self.events = EventStreams(
            self.handler, self.config, bus, js, invoke=self._invoke, publish=self._publish
        )
        await self.events.start()

    async def stop(self) -> None:
        """Idempotent. Take no new work, let what is in flight finish within the drain
        timeout (the handler still runs), cancel the rest (callers get a 503, events are
        nak'ed for another activator)."""
        if self._stopped:
            return
        self._stopped = True
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                log.debug("%s: unsubscribing svc.invoke failed", self.handler.id, exc_info=True)
            self._sub = None
        timeout = self.config.drain_timeout_s
        await asyncio.gather(
            self._drain_requests(timeout),
            self.events.stop(timeout) if self.events else asyncio.sleep(0),
        )
        self.events = None

    async def _drain_requests(self, timeout: float) -> None:
        if not self._requests:
            return
        _, late = await asyncio.wait(set(self._requests), timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _on_spec_updated(self, msg: SpecUpdated, _raw: Msg) -> None:
        if self.events is not None and not msg.spec.revision_of:  # clients call the service
            await self.events.ensure(msg.spec.name, deployed=True)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        if self.events is not None:
            await self.events.delete(msg.name)

    # ---- request-reply ------------------------------------------------------------------

    async def _on_invoke(self, raw: Msg) -> None:
        """One task per request: a cold one waits seconds for its pod, and nats-py runs a
        subscription's callbacks one at a time."""
        if not raw.reply:  # nobody to answer: fire-and-forget belongs on svc.events
            self.handler.metrics.counter("fnplane.activator.nats.dropped").add(
                1, {"reason": "no_reply"})
            return
        task = asyncio.create_task(self._answer(raw))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _answer(self, raw: Msg) -> None:
        name = ep.INVOKE.params_of(raw.subject).get("service", "")
        streaming = wants_stream(raw.headers)
        try:
            answer = await self._invoke(name, raw, stream=True)
            if answer.stream is not None and not streaming:  # one message, as always
                try:
                    answer = replace(answer, body=await answer.stream.read_all(), stream=None)
                except Exception as exc:
                    answer = stream_failure(exc)
        except asyncio.CancelledError:
            retry = self.handler.config.retry_after_s
            await self._publish(
                raw.reply, error(503, "the activator is shutting down", retry_after_s=retry)
            )
            raise
        self.handler.metrics.counter("fnplane.activator.nats.requests").add(
            1, {SERVICE: name, STATUS_CODE: str(answer.status)})
        if answer.stream is not None:
            await self._publish_stream(raw.reply, answer)
        else:
            await self._publish(raw.reply, answer)

    async def _publish_stream(self, subject: str, answer: Answer) -> None:
        """The framing of activator/nats_stream.py: head, chunks, end."""
        stream = answer.stream
        assert stream is not None
        seq = 0
        nc = self.bus.nc
        try:
            await nc.publish(subject, b"", headers={**nats_headers(answer), STREAM_HEADER: HEAD})
            end: dict[str, str] = {}
            body = b""
            try:
                async for chunk in stream:
                    seq += 1
                    await nc.publish(subject, chunk,
                                     headers={STREAM_HEADER: CHUNK, SEQ_HEADER: str(seq)})
            except (nats.errors.Error, OSError):
                raise
            except Exception as exc:
                failed = stream_failure(exc)
                end, body = nats_headers(failed), failed.body
            await nc.publish(subject, body,
                             headers={**end, STREAM_HEADER: END, SEQ_HEADER: str(seq)})
        except (nats.errors.Error, OSError):  # closing: the requester times out instead
            log.debug("%s: stream on %s lost", self.handler.id, subject, exc_info=True)
        finally:
            stream.close("error")  # a no-op when it ended; else the slot is given back

    async def _invoke(self, name: str, raw: Msg, *, stream: bool = False) -> Answer:
        """`invoke` inside the caller's trace; an unexpected failure is a 500, not silence."""
        try:
            if self.gate is not None:
                refused = await self.gate(name, header(raw.headers, "authorization"))
                if refused is not None:
                    return refused
            with telemetry.continue_trace(raw.headers, f"{self.handler.id} {raw.subject}"):
                return await invoke(self.handler, name, raw.data, raw.headers, stream=stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.handler.id, raw.subject)
            return error(500, f"{type(exc).__name__}: {exc}")

    async def _publish(self, subject: str, answer: Answer) -> None:
        try:
            await self.bus.nc.publish(subject, answer.body, headers=nats_headers(answer))
        except (nats.errors.Error, OSError):  # closing: the requester times out instead
            log.debug("%s: answer on %s lost", self.handler.id, subject, exc_info=True)
