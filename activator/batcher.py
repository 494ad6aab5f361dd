"""Micro-batching in front of one service's pods (issue 4): for a service whose spec sets
`batching.max_batch_size > 0`, requests that arrive together reach a pod as ONE request, and
each caller gets back only its own rows (KServe v1 `instances`, OIP v2 tensors). No network
here: the request handler injects `send`, which forwards one merged body to one pod.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from activator.batch_codec import Rows, SplitError, merge, parse, split
from kernel.messages import BatchingSpec

Protocol = Literal["v1", "v2"]
Send = Callable[[str, dict], Awaitable[tuple[int, dict]]]


class BatcherClosed(Exception):
    """submit() after close(): the service is going away (the handler answers 503)."""


class BatchAborted(Exception):
    """The batch's send was cancelled (close() ran out of time): there is no answer."""


# ---- the batcher ------------------------------------------------------------------------


@dataclass(eq=False)
class _Member:
    payload: dict
    rows: Rows | None  # None: opaque, sent alone as is
    future: asyncio.Future[tuple[int, dict]]
    batch: _Batch | None = None

    @property
    def count(self) -> int:
        # An opaque request counts as one row: the pod sees at least that many.
        return self.rows.count if self.rows is not None else 1


@dataclass(eq=False)
class _Batch:
    protocol: str
    key: tuple | None  # None: a batch of one that was never open
    deadline: float
    members: list[_Member] = field(default_factory=list)
    rows: int = 0
    sent: bool = False

    def add(self, member: _Member) -> None:
        member.batch = self
        self.members.append(member)
        self.rows += member.count


class MicroBatcher:
    """Batches one service's requests, per protocol and (v2) per input signature.

    Flush policy: an open batch goes out as soon as it holds `max_batch_size` rows, when the
    next compatible request would not fit (it then opens the next batch), or `max_wait_ms`
    after its FIRST request arrived, whichever comes first; so no request waits in the
    batcher longer than `max_wait_ms`. A request of `max_batch_size` rows or more goes out at
    once, alone and whole (never split). With `eager=True` a request that finds the batcher
    idle (nothing open, nothing in flight) also goes out at once: under light load batching
    adds no latency, while under load requests pile up behind the batch in flight and batch
    sizes grow with the load (Clipper/Nexus adaptive batching, without a latency model).
    The default is False: the spec's `max_wait_ms` is then the exact window.

    Error policy: a non-2xx answer to a batch is every member's answer (one bad row fails
    its batch, so the handler validates payloads before batching); a 2xx answer that cannot
    be cut by rows becomes 502 for every member; if `send` raises, every member's submit
    raises it. A batch of one is sent as is and its answer returned verbatim. A submitter
    cancelled before its batch goes out leaves the batch; after, its rows are discarded.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        send: Send,
        *,
        clock: Callable[[], float] = time.monotonic,
        eager: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not (math.isfinite(max_wait_ms) and max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.eager = eager
        self._send = send
        self._clock = clock
        self._open: dict[tuple, _Batch] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self.batches_sent = 0
        self.rows_sent = 0
        self.max_rows_in_a_batch = 0

    @classmethod
    def for_spec(
        cls,
        batching: BatchingSpec,
        send: Send,
        *,
        clock: Callable[[], float] = time.monotonic,
        eager: bool = False,
    ) -> MicroBatcher | None:
        """The batcher a service's spec asks for, or None when it does not batch."""
        if batching.max_batch_size <= 0:
            return None
        return cls(batching.max_batch_size, batching.max_wait_ms, send, clock=clock, eager=eager)

    @property
    def pending_rows(self) -> int:
        return sum(b.rows for b in self._open.values())

    @property
    def in_flight(self) -> int:
        return len(self._sending)

    async def __aenter__(self) -> MicroBatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, protocol: Protocol, payload: dict) -> tuple[int, dict]:
        """This request's own (status, body), once its batch has been answered."""
        if protocol not in ("v1", "v2"):
            raise ValueError(f"protocol must be 'v1' or 'v2', got {protocol!r}")
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        future = asyncio.get_running_loop().create_future()
        member = _Member(payload, parse(protocol, payload), future)
        self._admit(protocol, member)
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(member)
            raise

    def flush_due(self) -> None:
        """Send every open batch whose wait is over by the clock (the timer calls this;
        tests on a fake clock call it after moving time)."""
        now = self._clock()
        for batch in [b for b in self._open.values() if b.deadline <= now]:
            self._flush(batch)
        self._arm()

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, send what is open, wait for the batches in flight (those
        still running after `timeout` are cancelled and their members get BatchAborted)."""
        self._closed = True
        for batch in list(self._open.values()):
            self._flush(batch)
        self._arm()
        if not self._sending:
            return
        _, late = await asyncio.wait(set(self._sending), timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    # ---- internals -----------------------------------------------------------------------

    def _admit(self, protocol: str, member: _Member) -> None:
        now = self._clock()
        rows = member.rows
        idle = not self._open and not self._sending
        if rows is None or rows.count >= self.max_batch_size or (self.eager and idle):
            alone = _Batch(protocol, None, now)
            alone.add(member)
            self._dispatch(alone)
            return
        batch = self._open.get(rows.key)
        if batch is not None and batch.rows + rows.count > self.max_batch_size:
            self._flush(batch)
            batch = None
        if batch is None:
            batch = self._open[rows.key] = _Batch(protocol, rows.key, now + self.max_wait_s)
        batch.add(member)
        if batch.rows >= self.max_batch_size or batch.deadline <= now:
            self._flush(batch)
        self._arm()

    def _withdraw(self, member: _Member) -> None:
        """The submitter is gone: take its rows out of a batch not yet sent."""
        if member.future.done() and not member.future.cancelled():
            member.future.exception()  # retrieved: no "never retrieved" warning
        batch = member.batch
        if batch is None or batch.sent:
            return
        batch.members.remove(member)
        batch.rows -= member.count
        if not batch.members and self._open.get(batch.key) is batch:
            del self._open[batch.key]
            self._arm()

    def _flush(self, batch: _Batch) -> None:
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        self._dispatch(batch)

    def _dispatch(self, batch: _Batch) -> None:
        batch.sent = True
        self.batches_sent += 1
        self.rows_sent += batch.rows
        self.max_rows_in_a_batch = max(self.max_rows_in_a_batch, batch.rows)
        task = asyncio.get_running_loop().create_task(self._run(batch), name="micro-batch")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _arm(self) -> None:
        """One timer, at the earliest deadline of the open batches."""
        deadline = min((b.deadline for b in self._open.values()), default=math.inf)
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline < math.inf:
            delay = max(0.0, deadline - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.flush_due()

    async def _run(self, batch: _Batch) -> None:
        members = batch.members
        try:
            if len(members) == 1:
                payload = members[0].payload
            else:
                parsed = [m.rows for m in members if m.rows is not None]
                payload = merge(batch.protocol, parsed, members[0].payload)
            status, body = await self._send(batch.protocol, payload)
            for member, answer in zip(members, self._answers(batch, status, body), strict=True):
                if not member.future.done():
                    member.future.set_result(answer)
        except asyncio.CancelledError:
            _fail(members, BatchAborted("the batch was cancelled before the pod answered"))
            raise
        except Exception as exc:
            _fail(members, exc)
        finally:
            _fail(members, BatchAborted("the batch ended without an answer"))

    @staticmethod
    def _answers(batch: _Batch, status: int, body: dict) -> list[tuple[int, dict]]:
        members = batch.members
        if len(members) == 1:
            return [(status, body)]
        if not 200 <= status < 300:
            return [(status, body if i == 0 else copy.deepcopy(body)) for i in range(len(members))]
        try:
            parts = split(batch.protocol, body, [m.rows for m in members if m.rows is not None])
        except SplitError as exc:
            return [(502, {"error": f"bad answer to a batch from the pod: {exc}"}) for _ in members]
        return [(status, part) for part in parts]


def _fail(members: list[_Member], exc: BaseException) -> None:
    for member in members:
        if not member.future.done():
            member.future.set_exception(exc)
