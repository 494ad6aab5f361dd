"""Fire-and-forget events of the activator's NATS ingress: one JetStream stream per service
on `svc.events.{service}`, a durable pull consumer shared by every activator, a per-service
worker that serves events through the request handler like any request, and the consumer's lag
reported to `scale` as demand, so waiting events alone wake a service at zero.

A stream is a work queue (an event leaves it once acked or given up; one durable consumer is
what a work queue allows, and every activator pulls from that one), bounded in age, count and
bytes. At the bound a new event is refused, not an old one dropped: a JetStream publisher
learns from its ack that its event was not taken, where discarding old ones would lose events
already acknowledged to their publishers without anyone hearing of it. A service's stream is
deleted with the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError

from activator.handler import Answer, Handler
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.config import NatsIngressConfig
from kernel.errors import RemoteError
from kernel.messages import Demand
from kernel.metrics import SERVICE
from kernel.shards import shard_of
from kernel.store import STATE_SCHEMA, schema_verdict

log = logging.getLogger(__name__)

DURABLE = "fnplane-activator"
# The stream metadata key of its schema stamp (kernel.store.STATE_SCHEMA).
SCHEMA_METADATA = "fnplane.schema"
# A stream's lag is one number whichever activator reads it; `scale` sums reports per
# reporter, so every activator reports it under this one key and it is counted once.
LAG_REPORTER = f"{DURABLE}-events"
REPLY_TO_HEADER = "Fnplane-Reply-To"

Invoke = Callable[[str, Msg], Awaitable[Answer]]
Publish = Callable[[str, Answer], Awaitable[None]]


def stream_name(service: str) -> str:
    return "FNPLANE_EV_" + service.replace("-", "_")


@dataclass(eq=False)
class ServiceEvents:
    """One service's stream as this activator pulls from it, and the events it serves now."""

    service: str
    stream: str
    ready: bool = False  # stream and consumer exist
    sub: JetStreamContext.PullSubscription | None = None  # only while consuming
    worker: asyncio.Task[None] | None = None
    in_flight: int = 0  # events inside the request handler
    backlog: deque[Msg] = field(default_factory=deque)  # fetched, not started yet
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    legacy: bool = False  # an earlier release's stream, migrated once nothing waits in it


class EventStreams:
    """Owned by `NatsIngress`, which lends its connection, its invocation and its replies."""

    def __init__(
        self,
        handler: Handler,
        config: NatsIngressConfig,
        bus: Bus,
        js: JetStreamContext,
        *,
        invoke: Invoke,
        publish: Publish,
    ) -> None:
        self.handler = handler
        self.config = config
        self.bus = bus
        self.js = js
        self._invoke = invoke
        self._publish = publish
        self.ack_wait_s = config.ack_wait_s or 2 * handler.config.request_timeout_s
        # Half the buffer at most, so HTTP and request-reply callers always find room.
        self.limit = max(1, min(config.max_in_flight, handler.config.buffer_size // 2))
        self.streams: dict[str, ServiceEvents] = {}
        self._retiring: set[ServiceEvents] = set()
        # Deleted services whose names the lag loop must not bring back (the handler's
        # table may hear of the delete after this does); a new deploy lifts it.
        self._deleted: set[str] = set()
        self._lag_task: asyncio.Task[None] | None = None
        self._reported: set[str] = set()
        self._stopping = False

    async def start(self) -> None:
        for name in self.handler.table.names():
            await self.ensure(name)
        self._lag_task = asyncio.create_task(self._lag_loop(), name=f"{self.handler.id}-lag")

    async def stop(self, timeout: float) -> None:
        """Stop fetching (never mid-fetch: a pull request abandoned on the server would hold
        its events until their ack wait ran out), let events in flight finish within
        `timeout`, then cancel them: a cancelled event is nak'ed for another activator."""
        self._stopping = True
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
        every = [*self.streams.values(), *self._retiring]
        pending: set[asyncio.Task[None]] = set()
        for ev in every:
            ev.stopping = True
            ev.freed.set()
            pending |= ev.handlers | ({ev.worker} if ev.worker else set())
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self.streams.clear()
        self._retiring.clear()

    # ---- streams, one per service ---------------------------------------------------------

    async def ensure(self, name: str, *, deployed: bool = False) -> None:
        """Create (or adopt) the service's stream and durable consumer, and start its worker.
        A failure is retried by the next lag tick, which ensures every known service.
        `deployed`: on the service's deploy event, which may follow its delete."""
        if deployed:
            self._deleted.discard(name)
        if self._stopping or name in self.streams or name in self._deleted:
            return
        ev = self.streams[name] = ServiceEvents(name, stream_name(name))
        cfg = self.config
        stream = StreamConfig(
            name=ev.stream,
            subjects=[ep.EVENTS.subject_for(service=name)],
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=cfg.stream_max_age_s,
            max_msgs=cfg.stream_max_msgs,
            max_bytes=cfg.stream_max_bytes,
            discard=DiscardPolicy.NEW,
            storage=StorageType.FILE,
            num_replicas=1,
            metadata={SCHEMA_METADATA: str(STATE_SCHEMA)},
        )
        consumer = ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_ack_pending=cfg.max_ack_pending,
            max_deliver=cfg.max_deliver,
        )
        try:
            info = await self._check_schema(ev.stream)
            if info is not None and info.config.retention != RetentionPolicy.WORK_QUEUE:
                stream = await self._migrate(ev, info, stream)
            try:
                await self.js.add_stream(stream)
            except BadRequestError:  # exists with other limits: the config is ours to set
                await self.js.update_stream(stream)
            await self.js.add_consumer(ev.stream, consumer)
            if cfg.consume_events:
                ev.sub = await self.js.pull_subscribe_bind(durable=DURABLE, stream=ev.stream)
        except Exception as exc:
            log.warning("%s: no event stream for %s yet: %s", self.handler.id, name, exc)
            if self.streams.get(name) is ev:
                del self.streams[name]
            return
        ev.ready = True
        if ev.sub is not None and not ev.stopping:
            ev.worker = asyncio.create_task(self._work(ev), name=f"events-{name}")

    async def _check_schema(self, stream: str) -> StreamInfo | None:
        """A stream stamped by a newer release is left alone (its events wait for that
        release); one without a stamp is the first release's, adopted and stamped below."""
        try:
            info = await self.js.stream_info(stream)
        except NotFoundError:
            return None
        found = (info.config.metadata or {}).get(SCHEMA_METADATA)
        schema_verdict(int(found) if found else None, where=f"JetStream stream {stream}")
        return info

    async def _migrate(self, ev: ServiceEvents, info: StreamInfo,
                       wanted: StreamConfig) -> StreamConfig:
        """An earlier release's stream keeps acked events (limits retention), and JetStream
        cannot change a stream's retention. Once nothing in it waits to be served, what it
        holds was all served: it is deleted and made again as a work queue. Until then it
        keeps its retention (and drops its oldest, as it always did, now also past the byte
        limit), and the lag loop tries again once its consumer has caught up. Trap: an event
        published between that check and the delete is lost; the window is one round trip."""
        name = wanted.name or ev.stream
        try:
            consumer = await self.js.consumer_info(name, DURABLE)
            waiting = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
        except NotFoundError:
            waiting = info.state.messages  # nobody served it: all of it may be waiting
        if waiting == 0:
            with contextlib.suppress(NotFoundError):  # another activator was first
                await self.js.delete_stream(name)
            log.info("%s: event stream %s of an earlier release remade as a work queue",
                     self.handler.id, name)
            return wanted
        ev.legacy = True
        log.warning("%s: event stream %s of an earlier release keeps served events; %d wait "
                    "to be served, after which it becomes a work queue", self.handler.id, name,
                    waiting)
        return replace(wanted, retention=info.config.retention, discard=DiscardPolicy.OLD)

    async def delete(self, name: str) -> None:
        """The service is deleted: so are its stream and the events waiting in it (nobody
        would serve them, and a stream per deleted name would pile up). Every activator
        hears the delete; the first removes the stream, the others find it gone."""
        self._deleted.add(name)
        self.retire(name)
        try:
            await self.js.delete_stream(stream_name(name))
        except NotFoundError:
            pass
        except Exception as exc:
            log.warning("%s: event stream of deleted %s not removed: %s", self.handler.id,
                        name, exc)

    def retire(self, name: str) -> None:
        """Stop this activator's worker of the service's stream (the stream stays)."""
        ev = self.streams.pop(name, None)
        if ev is None:
            return
        ev.stopping = True
        ev.freed.set()
        if ev.worker is not None and not ev.worker.done():
            self._retiring.add(ev)
            ev.worker.add_done_callback(lambda _t: self._retiring.discard(ev))

    # ---- the per-service worker -----------------------------------------------------------

    def _room(self, ev: ServiceEvents) -> int:
        """Events that may start now: within this activator's per-service limit and within
        what the service's buffer still holds, so events never crowd callers out of it."""
        svc = self.handler.table.front(ev.service)
        if svc is None:
            return 0
        thr = svc.throttler
        return min(self.limit - ev.in_flight, thr.buffer_size - thr.buffered)

    async def _work(self, ev: ServiceEvents) -> None:
        assert ev.sub is not None
        backoff = 0.5
        try:
            while not ev.stopping:
                while ev.backlog and self._room(ev) > 0:
                    self._start_event(ev, ev.backlog.popleft())
                want = min(self._room(ev) - len(ev.backlog), self.config.fetch_batch)
                if want <= 0:
                    if ev.service not in self.handler.table:
                        with contextlib.suppress(RemoteError):  # asked again next round
                            await self.handler.lookup(ev.service)  # its spec event is in flight
                    ev.freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ev.freed.wait(), 0.5)
                    continue
                try:
                    msgs = await ev.sub.fetch(want, timeout=self.config.fetch_timeout_s)
                except TimeoutError:
                    continue
                except Exception as exc:
                    log.warning("%s: fetching events of %s: %s", self.handler.id, ev.service, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                backoff = 0.5
                # fetch() may hand over strays of an earlier pull beyond `want`: they wait
                # here, never in the service's buffer.
                ev.backlog.extend(msgs)
        finally:
            while ev.backlog:  # fetched, never started: back to the stream at once
                with contextlib.suppress(nats.errors.Error, OSError):
                    await ev.backlog.popleft().nak()
            # Unsubscribe rather than leave it to the connection's drain: status messages
            # of an expired pull may sit in its queue, and a drain would wait for them.
            with contextlib.suppress(nats.errors.Error, OSError):
                await ev.sub.unsubscribe()

    def _start_event(self, ev: ServiceEvents, msg: Msg) -> None:
        ev.in_flight += 1
        task = asyncio.create_task(self._handle(ev, msg))
        ev.handlers.add(task)
        task.add_done_callback(ev.handlers.discard)

    async def _handle(self, ev: ServiceEvents, msg: Msg) -> None:
        keep_alive = asyncio.create_task(self._keep_alive(msg))
        try:
            answer = await self._invoke(ev.service, msg)
            await self._settle(ev.service, msg, answer)
        except asyncio.CancelledError:
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak()
            raise
        finally:
            keep_alive.cancel()
            ev.in_flight -= 1
            ev.freed.set()

    async def _keep_alive(self, msg: Msg) -> None:
        """A pod may take longer than the ack wait to answer; tell JetStream we are on it,
        so only a crashed activator's events come back after the ack wait."""
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.in_progress()

    async def _settle(self, service: str, msg: Msg, answer: Answer) -> None:
        """Ack only once the pod answered (2xx). Bad input (4xx) is terminated: no retry can
        cure it. Anything else (5xx, timeouts) is redelivered later with a growing delay,
        until `max_deliver`. The reply subject, if any, hears the final outcome only."""
        delivered = msg.metadata.num_delivered
        if answer.ok:
            outcome = "ack"
        elif not answer.retryable or delivered >= self.config.max_deliver:
            outcome = "term"
            log.warning(
                "%s: event %s of %s dropped after %d deliveries (%d): %s",
                self.handler.id,
                msg.metadata.sequence.stream,
                service,
                delivered,
                answer.status,
                answer.body[:200].decode(errors="replace"),
            )
        else:
            outcome = "nak"
        reply_to = (msg.headers or {}).get(REPLY_TO_HEADER)
        if reply_to and outcome != "nak":
            await self._publish(reply_to, answer)
        if outcome == "ack":
            await msg.ack()
        elif outcome == "term":
            await msg.term()
        else:
            cfg = self.config
            await msg.nak(delay=min(cfg.nak_delay_s * 2 ** (delivered - 1), cfg.nak_max_delay_s))
        self.handler.metrics.counter("fnplane.activator.events").add(
            1, {SERVICE: service, "outcome": outcome})

    # ---- consumer lag as demand ----------------------------------------------------------

    async def _lag_loop(self) -> None:
        interval = self.handler.config.metrics_interval_s
        while True:
            await asyncio.sleep(interval)
            known = set(self.handler.table.names())
            self._deleted &= known  # once the table forgot a deleted name, so can we
            for name in known:
                await self.ensure(name)  # services learnt by lookup, or a failed create
            now = time.time()
            for name, ev in list(self.streams.items()):
                if not ev.ready:
                    continue
                try:
                    info = await self.js.consumer_info(ev.stream, DURABLE, timeout=interval * 2)
                except NotFoundError:  # removed behind our back: the next tick recreates it
                    self.retire(name)
                    continue
                except Exception as exc:
                    log.debug("%s: lag of %s unknown: %s", self.handler.id, name, exc)
                    continue
                if ev.legacy and not (info.num_pending or info.num_ack_pending):
                    self.retire(name)  # caught up: the next tick remakes it as a work queue
                # Events inside the handler are in the activator's own demand report already.
                waiting = (info.num_pending or 0) + (info.num_ack_pending or 0) - ev.in_flight
                await self._report_lag(name, max(0, waiting), now)

    async def _report_lag(self, name: str, lag: int, now: float) -> None:
        """Waiting events count as buffered requests, urgent while no pod is ready: a
        service at zero scales up even before any worker fetched them."""
        if lag == 0 and name not in self._reported:
            return
        if lag:
            self._reported.add(name)
        else:
            self._reported.discard(name)  # one last zero, so `scale` forgets it at once
        # A service with revisions: the lag wakes the revision with the largest share (each
        # event is then drawn over the split as it is served, waking the others as needed).
        svc = self.handler.table.front(name)
        urgent = lag > 0 and (svc is None or svc.throttler.ready_pods() == 0)
        self.handler.metrics.gauge("fnplane.activator.events.lag").set(lag, {SERVICE: name})
        demand = Demand(service=svc.spec.name if svc is not None else name,
                        reporter=LAG_REPORTER, buffered=lag, in_flight=0,
                        requests=0, ts=now, urgent=urgent)
        try:
            await self.bus.send(ep.DEMAND, demand, shard=shard_of(demand.service))
        except (nats.errors.Error, OSError):
            log.debug("events: lag report of %s lost", name, exc_info=True)
