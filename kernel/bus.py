"""The NATS adapter every component uses, typed by the endpoint declarations
(`kernel.endpoints`): `send` publishes, `call` asks and waits for the typed answer, `gather`
collects the answers of many, `serve` subscribes a handler to one endpoint.

A handler receives the one request type its endpoint declares, decoded by that endpoint's
msgspec decoder. A payload of another type, or garbage, is counted in `rejected` and
answered with `ErrorCode.INVALID` when someone waits for an answer; an exception in a
handler is answered with `ErrorCode.INTERNAL`. Error replies also carry nats.py `micro`'s
`Nats-Service-Error` headers. Trace context rides in the W3C `traceparent` header so one cold
request is one trace across components.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from redis.exceptions import ConnectionError as RedisDown
from redis.exceptions import TimeoutError as RedisTimeout

from kernel import messages, telemetry
from kernel.endpoints import Endpoint, SubjectError
from kernel.errors import ErrorCode, NoResponders, RemoteError, RequestTimeout, http_status
from kernel.identity import Login
from kernel.messages import ErrorReply
from kernel.tasks import TaskGroup

log = logging.getLogger(__name__)


class _QuietTlsEof(logging.Filter):
    """nats.py reads through an asyncio StreamReader whose protocol, upgraded to TLS, makes
    asyncio warn "returning true from eof_received() has no effect when using ssl" on
    every closed TLS connection; harmless, and noise on every CLI call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsEof())

Handler = Callable[[Any, Msg], Awaitable[Any]]
# Called after a reconnect with the time the connection was lost.
ReconnectHook = Callable[[float], Awaitable[None]]

SCHEMA_HEADER = "Fnplane-Schema"
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def _decoder(t: Any) -> msgspec.msgpack.Decoder[Any]:
    """One decoder per type (and per reply type with `ErrorReply` beside it), made once."""
    dec = _decoders.get(t)
    if dec is None:
        dec = _decoders[t] = msgspec.msgpack.Decoder(t)
    return dec


_reply_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {}


def _reply_decoder(ep: Endpoint[Any, Any]) -> msgspec.msgpack.Decoder[Any]:
    """The endpoint's reply type or an `ErrorReply`, made once per endpoint (building the
    union on every call costs a placement-heavy caller a measurable share of its rate)."""
    dec = _reply_decoders.get(ep.name)
    if dec is None:
        dec = _reply_decoders[ep.name] = msgspec.msgpack.Decoder(ep.reply | ErrorReply)
    return dec


class Bus:
    """One NATS connection plus the subscriptions a component owns."""

    def __init__(self, nc: NATS, name: str) -> None:
        self.nc = nc
        self.name = name
        self._subs: list[Subscription] = []
        # Handlers of `concurrent` subscriptions, one task per message.
        self._handlers = TaskGroup(name)
        # Per endpoint name: payloads that did not decode as its request type.
        self.rejected: collections.Counter[str] = collections.Counter()
        # When the connection was lost (None while connected), and who wants to know it is
        # back: messages published just before a loss vanish without an error, so whoever
        # announces state announces it again.
        self.disconnected_at: float | None = None
        self._reconnect_hooks: list[ReconnectHook] = []

    def on_reconnect(self, hook: ReconnectHook) -> None:
        self._reconnect_hooks.append(hook)

    async def _disconnected(self) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = time.time()

    async def _reconnected(self) -> None:
        since, self.disconnected_at = self.disconnected_at or time.time(), None
        log.info("%s: reconnected to NATS", self.name)
        for hook in self._reconnect_hooks:
            self._handlers.spawn(hook(since), name="reconnected")

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        connect_timeout: float = 5.0,
        reconnect: bool = True,
        login: Login | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Bus:
        """Components reconnect forever (NATS restarts must not kill them); a CLI call
        does not, so a stack that is not running is an error at once, not a hang. `login`
        (kernel.identity) is the user, password and reply-inbox prefix of a component kind;
        `tls` (`TlsConfig.client_context()`) verifies a server that requires TLS."""
        made: list[Bus] = []  # the callbacks exist before the Bus they report to

        async def disconnected() -> None:
            if made:
                await made[0]._disconnected()

        async def reconnected() -> None:
            if made:
                await made[0]._reconnected()

        nc = await nats.connect(
            url,
            name=name,
            **(login.nats_options() if login is not None else {}),
            tls=tls,
            connect_timeout=connect_timeout,
            # nats-py retries the first connect until attempts run out, even without
            # allow_reconnect: one retry, then NoServersError.
            max_reconnect_attempts=-1 if reconnect else 1,
            reconnect_time_wait=0.2,
            allow_reconnect=reconnect,
            error_cb=_log_error,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
        )
        made.append(bus := cls(nc, name))
        return bus

    # ---- sending --------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str] | None:
        """The schema version, with the trace context when a span is current. A message
        with nothing else to carry goes without headers: it is read as the current major
        version (`messages.SCHEMA_VERSION`), and skipping them spares both ends the header
        block (~8% of a request-reply's cost through nats-py, on every placement)."""
        headers: dict[str, str] = {}
        telemetry.inject(headers)
        if extra:
            headers.update(extra)
        if not headers:
            return None
        headers[SCHEMA_HEADER] = messages.SCHEMA_VERSION
        return headers

    async def send(
        self,
        ep: Endpoint[Any, Any],
        msg: msgspec.Struct,
        *,
        headers: dict[str, str] | None = None,
        **params: str | int,
    ) -> None:
        """Publish on the endpoint's subject; nobody answers."""
        await self.nc.publish(
            ep.subject_for(**params), _encoder.encode(msg), headers=self._headers(headers)
        )

    async def call(
        self,
        ep: Endpoint[Any, Any],
        msg: msgspec.Struct,
        *,
        timeout: float = 2.0,
        headers: dict[str, str] | None = None,
        **params: str | int,
    ) -> Any:
        """Ask and wait for the endpoint's reply type; an error reply is raised as
        `RemoteError` with its code."""
        subject = ep.subject_for(**params)
        try:
            reply = await self.nc.request(
                subject, _encoder.encode(msg), timeout=timeout, headers=self._headers(headers)
            )
        except NoRespondersError:
            raise NoResponders(subject) from None
        except NatsTimeout:
            raise RequestTimeout(subject, timeout) from None
        try:
            answer = _reply_decoder(ep).decode(reply.data)
        except (msgspec.MsgspecError, ValueError) as exc:
            raise RemoteError(ErrorCode.INTERNAL, f"malformed reply on {subject}: {exc}") from None
        if type(answer) is ErrorReply:
            raise RemoteError(answer.code, answer.message)
        return answer

    async def gather(
        self,
        ep: Endpoint[Any, Any],
        msg: msgspec.Struct,
        *,
        timeout: float = 0.5,
        max_msgs: int = 1000,
        done: Callable[[list[Any]], bool] | None = None,
        **params: str | int,
    ) -> list[Any]:
        """Scatter-gather: collect replies until `done(replies)`, `max_msgs` or `timeout`.
        Error replies and replies that do not decode are left out (and counted)."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, max_msgs=max_msgs)
        answers: list[Any] = []
        dec = _decoder(ep.reply)
        try:
            await self.nc.publish(
                ep.subject_for(**params), _encoder.encode(msg), reply=inbox,
                headers=self._headers(None),
            )
            deadline = asyncio.get_running_loop().time() + timeout
            while len(answers) < max_msgs:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    raw = await sub.next_msg(timeout=left)
                except (TimeoutError, NatsTimeout):
                    break
                try:
                    answers.append(dec.decode(raw.data))
                except (msgspec.MsgspecError, ValueError):
                    self.rejected[f"{ep.name} reply"] += 1
                if done is not None and done(answers):
                    break
        except nats.errors.ConnectionClosedError:
            pass  # closing down: what arrived so far is the answer
        finally:
            if not self.nc.is_closed:
                await sub.unsubscribe()
        return answers

    # ---- receiving ------------------------------------------------------------------------

    async def serve(
        self,
        ep: Endpoint[Any, Any],
        handler: Handler,
        *,
        concurrent: bool = False,
        queue: str | None = None,
        **params: str | int,
    ) -> Subscription:
        """Route requests of `ep` to `handler(request, raw)`; its return value (if any) is
        the reply. A parameter left out of `params` is a wildcard.

        nats-py runs one callback at a time per subscription; `concurrent=True` gives each
        message its own task, for handlers that wait on other components (placements).
        """
        dec = _decoder(ep.request)

        async def on_msg(raw: Msg) -> None:
            if concurrent:
                self._handlers.spawn(self._handle(ep, dec, handler, raw), name=ep.name)
            else:
                await self._handle(ep, dec, handler, raw)

        sub = await self.nc.subscribe(
            ep.subject_for(**params), queue=ep.queue if queue is None else queue, cb=on_msg
        )
        self._subs.append(sub)
        # Live on the server when we return: a caller told "ready" must not hit no responders.
        await self.nc.flush()
        return sub

    async def follow(self, changes: Endpoint[Any, None], current: Endpoint[Any, Any],
                     apply: Callable[[Any], object], *, timeout: float = 1.0) -> None:
        """Keep `apply` fed with a map the coordinator publishes: every change, and the map
        as it is now (a late joiner must not wait for the next change; with nobody to ask
        yet, the next change brings it)."""

        async def on_change(msg: Any, _raw: Msg) -> None:
            apply(msg)

        await self.serve(changes, on_change)
        try:
            apply(await self.call(current, messages.Empty(), timeout=timeout))
        except RemoteError:
            return

    async def unserve(self, sub: Subscription) -> None:
        """Stop serving what `serve` returned `sub` for (a shard that moved elsewhere)."""
        if sub in self._subs:
            self._subs.remove(sub)
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            log.debug("%s: unsubscribe failed", self.name, exc_info=True)

    async def _handle(
        self, ep: Endpoint[Any, Any], dec: msgspec.msgpack.Decoder[Any], handler: Handler,
        raw: Msg,
    ) -> None:
        version = (raw.headers or {}).get(SCHEMA_HEADER, messages.SCHEMA_VERSION)
        if version.split(".")[0] != messages.SCHEMA_VERSION:
            self.rejected[ep.name] += 1
            await self._reply_error(raw, ErrorCode.INVALID, f"unsupported schema version {version}")
            return
        try:
            msg = dec.decode(raw.data)
        except (msgspec.MsgspecError, ValueError) as exc:
            self.rejected[ep.name] += 1
            log.warning("%s: %s: not a %s: %s", self.name, raw.subject, ep.request.__name__, exc)
            await self._reply_error(raw, ErrorCode.INVALID,
                                    f"{ep.name} expects {ep.request.__name__}: {exc}")
            return
        try:
            with telemetry.continue_trace(raw.headers, f"{self.name} {raw.subject}"):
                answer = await handler(msg, raw)
        except RemoteError as exc:
            await self._reply_error(raw, exc.code, exc.message)
            return
        except (RedisDown, RedisTimeout) as exc:
            # Redis restarting: a retryable answer, not an internal error.
            log.warning("%s: %s: state store unavailable: %s", self.name, raw.subject, exc)
            await self._reply_error(raw, ErrorCode.UNAVAILABLE, f"state store unavailable: {exc}")
            return
        except SubjectError as exc:
            # The message named a service or node that is no subject token ('*', 'a.b', ''):
            # invalid input that decoded, not a failure of the handler.
            self.rejected[ep.name] += 1
            log.warning("%s: %s: %s", self.name, raw.subject, exc)
            await self._reply_error(raw, ErrorCode.INVALID, str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: handler for %s failed", self.name, raw.subject)
            await self._reply_error(raw, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        if raw.reply and answer is not None:
            await self._reply(raw, _encoder.encode(answer))

    async def _reply_error(self, raw: Msg, code: ErrorCode, message: str) -> None:
        if raw.reply:
            await self._reply(raw, _encoder.encode(ErrorReply(code=code, message=message)),
                              {ERROR_HEADER: message[:200],
                               ERROR_CODE_HEADER: str(http_status(code))})

    async def _reply(self, raw: Msg, data: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            await self.nc.publish(raw.reply, data, headers=headers)
        except (nats.errors.Error, OSError):
            # The connection is closing; the requester times out instead.
            log.debug("%s: reply on %s lost", self.name, raw.subject, exc_info=True)

    async def close(self) -> None:
        """Idempotent: unsubscribe, let running handlers finish briefly, drain, close."""
        if self.nc.is_closed:
            return
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                log.debug("%s: unsubscribe failed", self.name, exc_info=True)
        self._subs.clear()
        await self._handlers.close(timeout=2.0)
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=2.0)
        except (TimeoutError, nats.errors.Error):
            log.debug("%s: drain incomplete", self.name, exc_info=True)
        if not self.nc.is_closed:
            await self.nc.close()


async def _log_error(exc: Exception) -> None:
    """nats-py logs every failed reconnect with a traceback; one line is enough."""
    log.info("nats: %s", exc)
