"""Micro-batching in front of one service's pods (issue 4): for a service whose spec sets
`batching.max_batch_size > 0`, requests that arrive together reach a pod as ONE request, and
each caller gets back only its own rows (KServe v1 `instances`, OIP v2 tensors). No network
here: the gateway injects `send`, which forwards one merged body to one pod.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from controlplane.schemas import BatchingSpec

Protocol = Literal["v1", "v2"]
Send = Callable[[str, dict], Awaitable[tuple[int, dict]]]

_V2_REQUEST_KEYS = frozenset({"id", "inputs", "parameters", "outputs"})
_V2_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})


class BatcherClosed(Exception):
    """submit() after close(): the service is going away (the gateway answers 503)."""


class BatchAborted(Exception):
    """The batch's send was cancelled (close() ran out of time): there is no answer."""


class SplitError(ValueError):
    """A 2xx answer from the pod that cannot be cut back into one answer per request."""


# ---- what the batcher understands of a request ------------------------------------------


@dataclass(frozen=True, eq=False)
class Rows:
    """A request seen as rows: requests merge only when their `key`s are equal, `parts`
    holds its rows ready to concatenate (v1: the instances; v2: each input's flat data)."""

    key: tuple
    count: int
    parts: tuple[list, ...]
    request_id: str | None = None


def parse(protocol: str, payload: object) -> Rows | None:
    """The request's rows, or None when it is not plainly batchable (extra fields, ragged or
    inconsistent tensors): such a request goes to the pod alone and as is, so the pod, not
    a neighbour's batch, answers for what is wrong with it."""
    try:
        return _parse_v1(payload) if protocol == "v1" else _parse_v2(payload)
    except RecursionError:  # absurdly deep nesting: let the pod refuse it
        return None


def _parse_v1(payload: object) -> Rows | None:
    if not isinstance(payload, dict) or set(payload) != {"instances"}:
        return None
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        return None
    sig = _signature(instances)
    if sig is None:
        return None
    return Rows(("v1", sig[2]), len(instances), (instances,))


def _parse_v2(payload: object) -> Rows | None:
    if not isinstance(payload, dict) or not set(payload) <= _V2_REQUEST_KEYS:
        return None
    request_id, inputs = payload.get("id"), payload.get("inputs")
    if request_id is not None and not isinstance(request_id, str):
        return None
    if not isinstance(inputs, list) or not inputs:
        return None
    sigs, parts, rows = [], [], None
    for tensor in inputs:
        if not isinstance(tensor, dict) or not set(tensor) <= _V2_TENSOR_KEYS:
            return None
        name, dtype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not (isinstance(name, str) and isinstance(dtype, str) and _is_shape(shape)):
            return None
        if not shape or shape[0] < 1 or (rows is not None and shape[0] != rows):
            return None  # no batch dimension, or inputs disagree on the row count
        rows = shape[0]
        flat = _flatten(tensor.get("data"), shape)
        if flat is None:
            return None
        sigs.append((name, dtype, tuple(shape[1:]), _canonical(tensor.get("parameters"))))
        parts.append(flat)
    if len({s[0] for s in sigs}) != len(sigs):
        return None
    extras = (_canonical(payload.get("parameters")), _canonical(payload.get("outputs")))
    return Rows(("v2", tuple(sigs), extras), rows or 0, tuple(parts), request_id)


def _signature(value: object) -> object:
    """The structure of a JSON value (list lengths, dict keys, leaf kinds); None if ragged."""
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        inner = _signature(value[0]) if value else ()
        if inner is None or any(_signature(v) != inner for v in value[1:]):
            return None
        return ("list", len(value), inner)
    if isinstance(value, dict):
        items = tuple(sorted((k, _signature(v)) for k, v in value.items()))
        return None if any(s is None for _, s in items) else ("dict", items)
    return None


def _is_shape(shape: object) -> bool:
    return isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )


def _flatten(data: object, shape: list[int]) -> list | None:
    """Tensor data in row-major order, from flat or nested lists; None if it does not match
    the shape (a ragged nesting must not be silently 'repaired' by flattening)."""
    if not isinstance(data, list):
        return None
    if not any(isinstance(v, list) for v in data):
        return data if len(data) == math.prod(shape) else None
    flat: list = []

    def walk(node: object, dims: list[int]) -> bool:
        if not dims:
            flat.append(node)
            return not isinstance(node, list)
        if not isinstance(node, list) or len(node) != dims[0]:
            return False
        return all(walk(v, dims[1:]) for v in node)

    return flat if walk(data, shape) else None


def _canonical(value: object) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=repr)


# ---- one merged request, and its answer cut back ----------------------------------------


def merge(protocol: str, members: list[Rows], template: dict) -> dict:
    """One request carrying every member's rows in order; `template` is the first member's
    payload (all members share its key, hence its names, types and parameters)."""
    if protocol == "v1":
        return {"instances": list(itertools.chain.from_iterable(m.parts[0] for m in members))}
    total = sum(m.count for m in members)
    body = {k: v for k, v in template.items() if k != "id"}  # ids come back per member
    body["inputs"] = [
        {
            **tensor,
            "shape": [total, *tensor["shape"][1:]],
            "data": list(itertools.chain.from_iterable(m.parts[i] for m in members)),
        }
        for i, tensor in enumerate(template["inputs"])
    ]
    return body


def split(protocol: str, body: object, members: list[Rows]) -> list[dict]:
    """Each member's answer from the batch's answer, cut by row counts (row-major)."""
    total = sum(m.count for m in members)
    cuts = list(itertools.pairwise(itertools.accumulate((m.count for m in members), initial=0)))
    if not isinstance(body, dict):
        raise SplitError("the answer is not a JSON object")
    if protocol == "v1":
        preds = body.get("predictions")
        if not isinstance(preds, list) or len(preds) != total:
            got = len(preds) if isinstance(preds, list) else "no"
            raise SplitError(f"{got} predictions for a batch of {total} rows")
        return [{**body, "predictions": preds[a:b]} for a, b in cuts]
    outputs = body.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise SplitError("the answer has no 'outputs'")
    tensors = []
    for t in outputs:
        shape = t.get("shape") if isinstance(t, dict) else None
        if not _is_shape(shape) or not shape or shape[0] != total:
            raise SplitError(f"output shape {shape!r} is not batched over {total} rows")
        flat = _flatten(t.get("data"), shape)
        if flat is None:
            raise SplitError(f"output data does not match its shape {shape}")
        tensors.append((t, shape[1:], flat, math.prod(shape[1:])))
    head = {k: body[k] for k in ("model_name", "model_version") if k in body}
    answers = []
    for m, (a, b) in zip(members, cuts, strict=True):
        answer = dict(head)
        if m.request_id is not None:
            answer["id"] = m.request_id  # the pod's id was for the merged request: dropped
        if "parameters" in body:
            answer["parameters"] = body["parameters"]
        answer["outputs"] = [
            {**t, "shape": [b - a, *trail], "data": flat[a * size : b * size]}
            for t, trail, flat, size in tensors
        ]
        answers.append(answer)
    return answers


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
    its batch, so the gateway validates payloads before batching); a 2xx answer that cannot
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
