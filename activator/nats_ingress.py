"""The activator's NATS face (DESIGN.md, cold request step 1; issue 4). Request-reply on
`svc.invoke.{service}` answers exactly as the HTTP ingress does, through `Gateway.serve` (same
buffer, scale from zero, throttler), with KServe's error shape and the status in the
`Fnplane-Status` header. Fire-and-forget events on `svc.events.{service}` are `nats_events`'
business; this component owns the connection both share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from activator.gateway import Gateway
from activator.ingress import check_v1, check_v2
from activator.nats_events import EventStreams
from activator.proxy import PodUnreachable
from activator.throttler import BufferFull, ServiceGone, StartFailed, WaitTimeout
from kernel import endpoints as ep
from kernel import telemetry
from kernel.bus import Bus
from kernel.config import NatsIngressConfig
from kernel.messages import ServiceDeleted, SpecUpdated

log = logging.getLogger(__name__)

STATUS_HEADER = "Fnplane-Status"
# Pod answers a later retry may cure besides 5xx (KServe: 503 not ready).
RETRYABLE_4XX = frozenset({408, 429})
_FORWARDED = ("x-request-id", "tracestate")


# ---- one invocation, shared by request-reply and events ---------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    pod: str = ""
    retry_after_s: int = 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status in RETRYABLE_4XX

    def headers(self) -> dict[str, str]:
        headers = {STATUS_HEADER: str(self.status), "Content-Type": "application/json"}
        if self.pod:
            headers["Fnplane-Pod"] = self.pod
        if self.retry_after_s:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


def error(status: int, message: str, *, retry_after_s: int = 0) -> Answer:
    return Answer(status, json.dumps({"error": message}).encode(), retry_after_s=retry_after_s)


def pod_path(name: str, body: bytes) -> str | Answer:
    """Where the body goes on the pod, by protocol (OIP v2 `inputs`, KServe v1
    `instances`), or the 400 that keeps bad input from waking the service."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return error(400, f"invalid JSON body: {exc}")
    if isinstance(payload, dict) and "inputs" in payload:
        path, problem = f"/v2/models/{name}/infer", check_v2(payload)
    elif isinstance(payload, dict) and "instances" in payload:
        path, problem = f"/v1/models/{name}:predict", check_v1(payload)
    else:
        problem = (
            "invalid request: expected a JSON object with an 'inputs' list (Open Inference"
            " Protocol v2) or an 'instances' list (KServe v1)"
        )
    return error(400, problem) if problem else path


async def invoke(
    gateway: Gateway, name: str, body: bytes, headers: Mapping[str, str] | None
) -> Answer:
    """One inference through the gateway, errors mapped as activator/ingress.py maps them."""
    if await gateway.lookup(name) is None:
        return error(404, f"Model with name {name} does not exist.")
    path = pod_path(name, body)
    if isinstance(path, Answer):
        return path
    retry = gateway.config.retry_after_s
    rejected = "fnplane.activator.rejected"
    with telemetry.tracer.start_as_current_span(f"activator {name}") as span:
        forwarded = {"Content-Type": "application/json"}
        forwarded.update({k: v for k, v in (headers or {}).items() if k.lower() in _FORWARDED})
        telemetry.inject(forwarded)
        try:
            served = await gateway.serve(name, "POST", path, body, forwarded)
        except BufferFull as exc:
            gateway.metrics.inc(rejected, service=name, reason="buffer_full")
            return error(503, str(exc), retry_after_s=retry)
        except WaitTimeout as exc:
            gateway.metrics.inc(rejected, service=name, reason="timeout")
            return error(503, str(exc), retry_after_s=retry)
        except StartFailed as exc:
            gateway.metrics.inc(rejected, service=name, reason="start_failed")
            return error(503, f"service {name} failed to start: {exc}", retry_after_s=retry)
        except ServiceGone as exc:
            return error(503, str(exc), retry_after_s=retry)
        except PodUnreachable as exc:
            return error(502, f"pods of {name} unreachable: {exc}", retry_after_s=retry)
        except TimeoutError:
            return error(504, f"model {name} did not answer in {gateway.config.pod_timeout_s:g}s")
        span.set_attribute("fnplane.pod", served.pod)
        span.set_attribute("fnplane.cold", served.cold)
    return Answer(served.response.status, served.response.body, served.pod)


# ---- the component ----------------------------------------------------------------------


class NatsIngress:
    def __init__(self, gateway: Gateway, nats_url: str, config: NatsIngressConfig) -> None:
        self.gateway = gateway
        self.nats_url = nats_url
        self.config = config
        self.bus: Bus | None = None
        self.events: EventStreams | None = None  # None while JetStream is unavailable
        self._sub: Subscription | None = None
        self._requests: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        if self.bus is not None:
            return
        self.bus = bus = await Bus.connect(self.nats_url, f"{self.gateway.id}-nats")
        await bus.serve(ep.SERVICE_UPDATED, self._on_spec_updated)
        await bus.serve(ep.SERVICE_DELETED, self._on_service_deleted)
        # Client bodies are JSON, not fnplane messages: a raw subscription.
        self._sub = await bus.nc.subscribe(
            ep.INVOKE.pattern, queue=self.config.queue_group, cb=self._on_invoke
        )
        js = bus.nc.jetstream(timeout=2.0)
        try:
            await js.account_info()
        except Exception as exc:
            log.warning("%s: JetStream unavailable (%s): no events ingress", self.gateway.id, exc)
            return
        self.events = EventStreams(
            self.gateway, self.config, bus, js, invoke=self._invoke, publish=self._publish
        )
        await self.events.start()

    async def stop(self) -> None:
        """Idempotent. Take no new work, let what is in flight finish within the drain
        timeout (the gateway still runs), cancel the rest (callers get a 503, events are
        nak'ed for another activator), then drain the connection."""
        bus = self.bus
        if bus is None or self._stopping:
            return
        self._stopping = True
        try:
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
                self._sub = None
            timeout = self.config.drain_timeout_s
            await asyncio.gather(
                self._drain_requests(timeout),
                self.events.stop(timeout) if self.events else asyncio.sleep(0),
            )
            await bus.close()
        finally:
            self.bus = self.events = None
            self._stopping = False

    async def _drain_requests(self, timeout: float) -> None:
        if not self._requests:
            return
        _, late = await asyncio.wait(set(self._requests), timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _on_spec_updated(self, msg: SpecUpdated, _raw: Msg) -> None:
        if self.events is not None:
            await self.events.ensure(msg.spec.name)

    async def _on_service_deleted(self, msg: ServiceDeleted, _raw: Msg) -> None:
        if self.events is not None:
            self.events.retire(msg.name)

    # ---- request-reply ------------------------------------------------------------------

    async def _on_invoke(self, raw: Msg) -> None:
        """One task per request: a cold one waits seconds for its pod, and nats-py runs a
        subscription's callbacks one at a time."""
        if not raw.reply:  # nobody to answer: fire-and-forget belongs on svc.events
            self.gateway.metrics.inc("fnplane.activator.nats.dropped", reason="no_reply")
            return
        task = asyncio.create_task(self._answer(raw))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _answer(self, raw: Msg) -> None:
        name = ep.INVOKE.params_of(raw.subject).get("service", "")
        try:
            answer = await self._invoke(name, raw)
        except asyncio.CancelledError:
            retry = self.gateway.config.retry_after_s
            await self._publish(
                raw.reply, error(503, "the activator is shutting down", retry_after_s=retry)
            )
            raise
        self.gateway.metrics.inc(
            "fnplane.activator.nats.requests", service=name, status=str(answer.status)
        )
        await self._publish(raw.reply, answer)

    async def _invoke(self, name: str, raw: Msg) -> Answer:
        """`invoke` inside the caller's trace; an unexpected failure is a 500, not silence."""
        try:
            with telemetry.continue_trace(raw.headers, f"{self.gateway.id} {raw.subject}"):
                return await invoke(self.gateway, name, raw.data, raw.headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.gateway.id, raw.subject)
            return error(500, f"{type(exc).__name__}: {exc}")

    async def _publish(self, subject: str, answer: Answer) -> None:
        if self.bus is None:
            return
        try:
            await self.bus.nc.publish(subject, answer.body, headers=answer.headers())
        except Exception:  # connection closing: the requester times out instead
            log.debug("%s: answer on %s lost", self.gateway.id, subject, exc_info=True)
