"""The NATS adapter every component uses: typed publish, request-reply and subscriptions.

Messages are `schemas` Structs; errors cross the wire as `ErrorReply` values, never as
silence: a malformed message gets a 400 reply (or is counted and dropped when nobody waits
for an answer), an exception in a handler becomes a 500. Trace context rides in the W3C
`traceparent` header so one cold request is one trace across components.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from kernel import messages, telemetry
from kernel.messages import ErrorReply, Message

log = logging.getLogger(__name__)

Handler = Callable[[Message, Msg], Awaitable[Message | None]]

SCHEMA_HEADER = "Fnplane-Schema"


class RemoteError(Exception):
    """The other side answered with an `ErrorReply`; `code` follows HTTP."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NoResponders(RemoteError):
    def __init__(self, subject: str) -> None:
        super().__init__(503, f"nobody serves {subject}")


class RequestTimeout(RemoteError):
    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(504, f"no reply on {subject} within {timeout:.1f}s")


class Bus:
    """One NATS connection plus the subscriptions a component owns."""

    def __init__(self, nc: NATS, name: str) -> None:
        self.nc = nc
        self.name = name
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0  # malformed messages nobody could be told about

    @classmethod
    async def connect(
        cls, url: str, name: str, *, connect_timeout: float = 5.0, reconnect: bool = True
    ) -> Bus:
        """Components reconnect forever (NATS restarts must not kill them); a CLI call
        does not, so a stack that is not running is an error at once, not a hang."""
        nc = await nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout,
            # nats-py retries the first connect until attempts run out, even without
            # allow_reconnect: one retry, then NoServersError.
            max_reconnect_attempts=-1 if reconnect else 1,
            reconnect_time_wait=0.2,
            allow_reconnect=reconnect,
            error_cb=_log_error,
        )
        return cls(nc, name)

    # ---- sending --------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {SCHEMA_HEADER: messages.SCHEMA_VERSION}
        telemetry.inject(headers)
        if extra:
            headers.update(extra)
        return headers

    async def publish(
        self, subject: str, msg: Message, *, headers: dict[str, str] | None = None
    ) -> None:
        await self.nc.publish(subject, messages.encode(msg), headers=self._headers(headers))

    async def request(
        self,
        subject: str,
        msg: Message,
        *,
        timeout: float = 2.0,
        headers: dict[str, str] | None = None,
    ) -> Message:
        """Send and wait for the typed answer; an `ErrorReply` is raised as `RemoteError`."""
        try:
            reply = await self.nc.request(
                subject, messages.encode(msg), timeout=timeout, headers=self._headers(headers)
            )
        except NoRespondersError:
            raise NoResponders(subject) from None
        except NatsTimeout:
            raise RequestTimeout(subject, timeout) from None
        answer = messages.decode(reply.data)
        if isinstance(answer, ErrorReply):
            raise RemoteError(answer.code, answer.message)
        return answer

    async def request_many(
        self,
        subject: str,
        msg: Message,
        *,
        timeout: float = 0.5,
        max_msgs: int = 1000,
        done: Callable[[list[Message]], bool] | None = None,
    ) -> list[Message]:
        """Scatter-gather: collect answers until `done(answers)`, `max_msgs` or `timeout`."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, max_msgs=max_msgs)
        answers: list[Message] = []
        try:
            await self.nc.publish(
                subject, messages.encode(msg), reply=inbox, headers=self._headers(None)
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
                    answers.append(messages.decode(raw.data))
                except msgspec.MsgspecError:
                    self.dropped += 1
                if done is not None and done(answers):
                    break
        except nats.errors.ConnectionClosedError:
            pass  # closing down: what arrived so far is the answer
        finally:
            if not self.nc.is_closed:
                await sub.unsubscribe()
        return answers

    # ---- receiving ------------------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        queue: str = "",
        concurrent: bool = False,
    ) -> Subscription:
        """Route decoded messages to `handler`; its return value (if any) is the reply.

        nats-py runs one callback at a time per subscription; `concurrent=True` gives each
        message its own task, for handlers that wait on other components (placements).
        """

        async def on_msg(raw: Msg) -> None:
            if concurrent:
                task = asyncio.create_task(self._handle(handler, raw))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await self._handle(handler, raw)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_msg)
        self._subs.append(sub)
        return sub

    async def _handle(self, handler: Handler, raw: Msg) -> None:
        try:
            msg = messages.decode(raw.data)
        except (msgspec.MsgspecError, ValueError) as exc:
            log.warning("%s: malformed message on %s: %s", self.name, raw.subject, exc)
            if raw.reply:
                await self._reply(raw, ErrorReply(400, f"malformed message: {exc}"))
            else:
                self.dropped += 1
            return
        version = (raw.headers or {}).get(SCHEMA_HEADER, messages.SCHEMA_VERSION)
        if version.split(".")[0] != messages.SCHEMA_VERSION:
            if raw.reply:
                await self._reply(raw, ErrorReply(400, f"unsupported schema version {version}"))
            return
        try:
            with telemetry.continue_trace(raw.headers, f"{self.name} {raw.subject}"):
                answer = await handler(msg, raw)
        except RemoteError as exc:
            answer = ErrorReply(exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: handler for %s failed", self.name, raw.subject)
            answer = ErrorReply(500, f"{type(exc).__name__}: {exc}")
        if raw.reply and answer is not None:
            await self._reply(raw, answer)

    async def _reply(self, raw: Msg, answer: Message) -> None:
        try:
            await self.nc.publish(raw.reply, messages.encode(answer))
        except Exception:  # the connection is closing; the requester times out instead
            log.debug("%s: reply on %s lost", self.name, raw.subject, exc_info=True)

    async def close(self) -> None:
        """Idempotent: unsubscribe, let running handlers finish briefly, drain, close."""
        if self.nc.is_closed:
            return
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
            for task in self._tasks:
                task.cancel()
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=2.0)
        except Exception:
            pass
        if not self.nc.is_closed:
            await self.nc.close()


async def _log_error(exc: Exception) -> None:
    """nats-py logs every failed reconnect with a traceback; one line is enough."""
    log.info("nats: %s", exc)
