"""The activator's micro-batcher as a specification: which requests share a batch, when a
batch goes out, and that every caller gets exactly the answer it would have got alone.

Time is a fake clock moved by the tests (`wait` steps call `flush_due`, as the batcher's
timer does), so nothing here depends on the speed of the machine; the one real-timer test
only asserts generous upper bounds. The pod is a small fake whose answer for a row is a
function of that row alone, and whose rows carry (request, row, variant) so a batch that
mixed, dropped or duplicated rows shows in what the fake received.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator.batch_codec import Rows, merge, parse, split
from activator.batcher import BatchAborted, BatcherClosed, MicroBatcher
from examples.sample.model import load_model
from kernel.messages import BatchingSpec

FAR_MS = 60_000.0  # a window the real timer never closes during a fake-clock test


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Variant:
    """How a request is shaped: requests of different variants must never share a batch."""

    protocol: str
    trailing: tuple[int, ...]
    name: str = ""
    datatype: str = ""

    @property
    def width(self) -> int:
        return math.prod(self.trailing)


VARIANTS = [
    Variant("v1", (4,)),
    Variant("v1", (5,)),
    Variant("v2", (4,), "input-0", "FP32"),
    Variant("v2", (4,), "input-0", "FP64"),
    Variant("v2", (4,), "input-1", "FP32"),
    Variant("v2", (2, 3), "input-0", "FP32"),
]
V1, V2 = VARIANTS[0], VARIANTS[2]


def make_rows(req: int, n: int, variant: Variant) -> list[list[int]]:
    """Rows that name their request, their index and their variant, then some filler."""
    code = VARIANTS.index(variant)
    return [
        [req, r, code, *((req * 7 + r * 3 + j) % 11 for j in range(variant.width - 3))]
        for r in range(n)
    ]


def make_payload(
    req: int, n: int, variant: Variant = V1, *, nested: bool = False, rid: str | None = None
) -> dict:
    rows = make_rows(req, n, variant)
    if variant.protocol == "v1":
        return {"instances": rows}
    if nested:
        data: list = np.asarray(rows).reshape(n, *variant.trailing).tolist()
    else:
        data = [x for row in rows for x in row]
    tensor = {"name": variant.name, "shape": [n, *variant.trailing], "datatype": variant.datatype}
    payload: dict = {} if rid is None else {"id": rid}
    payload["inputs"] = [{**tensor, "data": data}]
    return payload


def rows_of(protocol: str, payload: dict) -> list[list[int]]:
    if protocol == "v1":
        return payload["instances"]
    tensor = payload["inputs"][0]
    return np.asarray(tensor["data"]).reshape(tensor["shape"][0], -1).tolist()


def pod_answer(protocol: str, payload: dict) -> dict:
    """What the fake pod computes: each row's answer depends on that row only."""
    rows = rows_of(protocol, payload)
    if protocol == "v1":
        return {"predictions": [[sum(r), r[0] * 1000 + r[1]] for r in rows]}
    answer: dict = {"model_name": "fake", "model_version": "7"}
    if "id" in payload:
        answer["id"] = payload["id"]
    sums = [sum(r) for r in rows]
    tags = [x for r in rows for x in r[:2]]
    answer["outputs"] = [
        {"name": "sum", "shape": [len(rows), 1], "datatype": "INT64", "data": sums},
        {"name": "tag", "shape": [len(rows), 2], "datatype": "INT64", "data": tags},
    ]
    return answer


class FakePod:
    """Records every request it gets; answers with `pod_answer`, or as told."""

    def __init__(self, *, status: int = 200, raises: Exception | None = None) -> None:
        self.status = status
        self.raises = raises
        self.gate: asyncio.Event | None = None
        self.received: list[tuple[str, dict]] = []

    def hold(self) -> asyncio.Event:
        self.gate = asyncio.Event()
        return self.gate

    async def __call__(self, protocol: str, payload: dict) -> tuple[int, dict]:
        self.received.append((protocol, payload))
        if self.gate is not None:
            await self.gate.wait()
        if self.raises is not None:
            raise self.raises
        if self.status != 200:
            return self.status, {"error": "row 3 is not a number"}
        return 200, pod_answer(protocol, payload)

    def batches(self) -> list[list[int]]:
        """Each received request as the request numbers it carried, in order."""
        return [sorted({row[0] for row in rows_of(p, body)}) for p, body in self.received]


async def settle() -> None:
    """Let every ready task run to its next real wait (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def no_other_tasks() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# ---- when a batch goes out --------------------------------------------------------------

# Steps: ("submit", request, rows) · ("wait", ms) moves the clock and runs the timer's check ·
# ("sent", batches) what the pod has received so far, each batch as its request numbers.
FLUSH_CASES = [
    pytest.param(4, 10, [("submit", 0, 2), ("sent", []), ("submit", 1, 2), ("sent", [[0, 1]])],
                 id="full-at-max-rows"),
    pytest.param(4, 10, [("submit", 0, 3), ("submit", 1, 2), ("sent", [[0]]), ("wait", 10),
                         ("sent", [[0], [1]])], id="a-request-that-does-not-fit-opens-the-next"),
    pytest.param(4, 10, [("submit", 0, 1), ("submit", 1, 6), ("sent", [[1]]), ("wait", 10),
                         ("sent", [[1], [0]])], id="oversized-request-goes-alone-and-whole"),
    pytest.param(4, 10, [("submit", 0, 4), ("sent", [[0]])], id="exactly-max-goes-at-once"),
    pytest.param(4, 10, [("submit", 0, 1), ("wait", 9.9), ("sent", []), ("wait", 0.1),
                         ("sent", [[0]])], id="a-lone-request-waits-max-wait-not-less"),
    pytest.param(4, 10, [("submit", 0, 1), ("wait", 6), ("submit", 1, 1), ("wait", 4),
                         ("sent", [[0, 1]])], id="wait-counts-from-the-first-request"),
    pytest.param(4, 10, [("submit", 0, 1), ("wait", 10), ("submit", 1, 1), ("sent", [[0]]),
                         ("wait", 10), ("sent", [[0], [1]])], id="a-late-request-starts-afresh"),
    pytest.param(4, 0, [("submit", 0, 1), ("sent", [[0]]), ("submit", 1, 1),
                        ("sent", [[0], [1]])], id="zero-wait-never-holds"),
    pytest.param(1, 10, [("submit", 0, 1), ("submit", 1, 1), ("sent", [[0], [1]])],
                 id="max-one-row-is-no-batching"),
]  # fmt: skip


@pytest.mark.parametrize(("max_rows", "max_wait_ms", "steps"), FLUSH_CASES)
async def test_flush_policy(max_rows: int, max_wait_ms: float, steps: list[tuple]) -> None:
    clock, pod = FakeClock(), FakePod()
    batcher = MicroBatcher(max_rows, max_wait_ms, pod, clock=clock)
    tasks: dict[int, tuple[asyncio.Task, dict]] = {}
    for step in steps:
        if step[0] == "submit":
            _, req, n = step
            payload = make_payload(req, n)
            tasks[req] = (asyncio.create_task(batcher.submit("v1", payload)), payload)
        elif step[0] == "wait":
            clock.now += step[1] / 1000.0
            batcher.flush_due()
        else:
            assert pod.batches() == step[1]
        await settle()
    await batcher.close()
    for task, payload in tasks.values():
        assert await task == (200, pod_answer("v1", payload))
    assert no_other_tasks()


async def test_the_real_timer_sends_a_lone_request_and_merges_a_burst() -> None:
    pod = FakePod()
    async with MicroBatcher(8, 20, pod) as batcher:
        alone = await asyncio.wait_for(batcher.submit("v1", make_payload(0, 1)), timeout=5)
        burst = [batcher.submit("v1", make_payload(req, 2)) for req in (1, 2, 3)]
        answers = await asyncio.wait_for(asyncio.gather(*burst), timeout=5)
    assert alone == (200, pod_answer("v1", make_payload(0, 1)))
    assert answers == [(200, pod_answer("v1", make_payload(r, 2))) for r in (1, 2, 3)]
    assert pod.batches() == [[0], [1, 2, 3]]
    assert no_other_tasks()


async def test_eager_sends_at_once_when_idle_and_batches_behind_a_busy_pod() -> None:
    clock, pod = FakeClock(), FakePod()
    gate = pod.hold()
    async with MicroBatcher(8, 10, pod, clock=clock, eager=True) as batcher:
        first = asyncio.create_task(batcher.submit("v1", make_payload(0, 1)))
        await settle()
        assert pod.batches() == [[0]], "idle: no wait at all"
        later = [asyncio.create_task(batcher.submit("v1", make_payload(r, 1))) for r in (1, 2)]
        await settle()
        assert pod.batches() == [[0]], "busy: the next requests wait for company"
        clock.now += 0.010
        batcher.flush_due()
        await settle()
        assert pod.batches() == [[0], [1, 2]]
        gate.set()
        await asyncio.gather(first, *later)
        assert batcher.pending_rows == 0 and batcher.in_flight == 0
        idle_again = await batcher.submit("v1", make_payload(3, 1))
    assert idle_again == (200, pod_answer("v1", make_payload(3, 1)))
    assert pod.batches()[-1] == [3]


async def test_without_eager_a_lone_request_waits_for_the_window() -> None:
    clock, pod = FakeClock(), FakePod()
    async with MicroBatcher(8, 10, pod, clock=clock) as batcher:
        task = asyncio.create_task(batcher.submit("v1", make_payload(0, 1)))
        await settle()
        assert pod.received == [] and batcher.pending_rows == 1
        clock.now += 0.010
        batcher.flush_due()
        await task
    assert pod.batches() == [[0]]


# ---- which requests may share a batch ---------------------------------------------------

V2_FP32 = {"name": "x", "datatype": "FP32"}
APART = [
    pytest.param(("v1", {"instances": [[1, 2, 3]]}),
                 ("v2", {"inputs": [{**V2_FP32, "shape": [1, 3], "data": [1, 2, 3]}]}),
                 id="v1-and-v2"),
    pytest.param(("v1", {"instances": [[1, 2, 3]]}), ("v1", {"instances": [[1, 2, 3, 4]]}),
                 id="v1-row-widths"),
    pytest.param(("v1", {"instances": [{"a": 1}]}), ("v1", {"instances": [{"b": 1}]}),
                 id="v1-dict-keys"),
    pytest.param(("v2", {"inputs": [{**V2_FP32, "shape": [1, 3], "data": [1, 2, 3]}]}),
                 ("v2", {"inputs": [{**V2_FP32, "name": "y", "shape": [1, 3], "data": [1, 2, 3]}]}),
                 id="v2-tensor-names"),
    pytest.param(("v2", {"inputs": [{**V2_FP32, "shape": [1, 3], "data": [1, 2, 3]}]}),
                 ("v2", {"inputs": [{**V2_FP32, "datatype": "FP64", "shape": [1, 3],
                                     "data": [1, 2, 3]}]}), id="v2-datatypes"),
    pytest.param(("v2", {"inputs": [{**V2_FP32, "shape": [2, 3], "data": [0] * 6}]}),
                 ("v2", {"inputs": [{**V2_FP32, "shape": [1, 6], "data": [0] * 6}]}),
                 id="v2-trailing-dims"),
    pytest.param(("v2", {"inputs": [{**V2_FP32, "shape": [1, 3], "data": [1, 2, 3]}]}),
                 ("v2", {"inputs": [{**V2_FP32, "shape": [1, 3], "data": [1, 2, 3]}],
                         "parameters": {"temperature": 0.5}}), id="v2-request-parameters"),
    pytest.param(("v2", {"inputs": [{**V2_FP32, "shape": [1, 3], "data": [1, 2, 3]}]}),
                 ("v2", {"inputs": [{**V2_FP32, "shape": [1, 3], "data": [1, 2, 3]}],
                         "outputs": [{"name": "probs"}]}), id="v2-requested-outputs"),
]  # fmt: skip


@pytest.mark.parametrize(("a", "b"), APART)
def test_incompatible_requests_never_share_a_key(a: tuple, b: tuple) -> None:
    ra, rb = parse(*a), parse(*b)
    assert ra is not None and rb is not None
    assert ra.key != rb.key


TOGETHER = [
    pytest.param({"inputs": [{**V2_FP32, "shape": [2, 2], "data": [1, 2, 3, 4]}]},
                 {"inputs": [{**V2_FP32, "shape": [1, 2], "data": [[5, 6]]}], "id": "b"},
                 id="flat-and-nested-with-and-without-id"),
    pytest.param({"inputs": [{**V2_FP32, "shape": [1, 2], "data": [1, 2],
                              "parameters": {"content_type": "np"}}]},
                 {"inputs": [{**V2_FP32, "shape": [3, 2], "data": [0] * 6,
                              "parameters": {"content_type": "np"}}]}, id="same-parameters"),
]  # fmt: skip


@pytest.mark.parametrize(("a", "b"), TOGETHER)
def test_compatible_v2_requests_share_a_key(a: dict, b: dict) -> None:
    ra, rb = parse("v2", a), parse("v2", b)
    assert ra is not None and rb is not None and ra.key == rb.key


OPAQUE = [
    pytest.param("v1", {"instances": []}, id="v1-no-rows"),
    pytest.param("v1", {"instances": [[1, 2], [3]]}, id="v1-ragged"),
    pytest.param("v1", {"instances": [[1, 2]], "signature_name": "x"}, id="v1-extra-field"),
    pytest.param("v1", {"inputs": [[1, 2]]}, id="v1-columnar"),
    pytest.param("v2", {"inputs": []}, id="v2-no-inputs"),
    pytest.param("v2", {"inputs": [{**V2_FP32, "shape": [2, 2], "data": [1, 2, 3]}]},
                 id="v2-data-shorter-than-shape"),
    pytest.param("v2", {"inputs": [{**V2_FP32, "shape": [2, 2], "data": [[1, 2, 3], [4]]}]},
                 id="v2-ragged-nesting"),
    pytest.param("v2", {"inputs": [{**V2_FP32, "shape": [0, 2], "data": []}]}, id="v2-no-rows"),
    pytest.param("v2", {"inputs": [{**V2_FP32, "shape": [], "data": [1]}]}, id="v2-scalar"),
    pytest.param("v2", {"inputs": [{**V2_FP32, "shape": [1, 1], "data": [1]},
                                   {**V2_FP32, "name": "y", "shape": [2, 1], "data": [1, 2]}]},
                 id="v2-inputs-disagree-on-rows"),
    pytest.param("v2", {"inputs": [{**V2_FP32, "shape": [1, 1], "data": [1]}], "id": 7},
                 id="v2-non-string-id"),
    pytest.param("v2", {"inputs": [{**V2_FP32, "shape": [1, 1], "data": [1]}], "x": 1},
                 id="v2-unknown-field"),
]  # fmt: skip


@pytest.mark.parametrize(("protocol", "payload"), OPAQUE)
async def test_a_request_the_batcher_does_not_understand_goes_alone_and_as_is(
    protocol: str, payload: dict
) -> None:
    assert parse(protocol, payload) is None
    clock = FakeClock()

    async def pod(p: str, body: dict) -> tuple[int, dict]:
        return 400, {"error": "the pod judges", "saw": body}

    async with MicroBatcher(8, FAR_MS, pod, clock=clock) as batcher:
        neighbour = asyncio.create_task(batcher.submit("v1", make_payload(0, 1)))
        assert await batcher.submit(protocol, payload) == (
            400,
            {"error": "the pod judges", "saw": payload},
        )
        assert not neighbour.done(), "the neighbour's batch is untouched"


async def test_v1_and_v2_and_signatures_are_batched_separately() -> None:
    clock, pod = FakeClock(), FakePod()
    async with MicroBatcher(64, FAR_MS, pod, clock=clock) as batcher:
        tasks = [
            asyncio.create_task(batcher.submit(v.protocol, make_payload(req, 2, v)))
            for req, v in enumerate(VARIANTS * 2)
        ]
        await settle()
        clock.now += FAR_MS
        batcher.flush_due()
        await asyncio.gather(*tasks)
    assert sorted(pod.batches()) == [[i, i + len(VARIANTS)] for i in range(len(VARIANTS))]


# ---- merging and splitting --------------------------------------------------------------


def test_v2_merge_flattens_row_major_and_split_gives_each_request_its_id() -> None:
    a = {"id": "a", "inputs": [{**V2_FP32, "shape": [1, 2, 2], "data": [[[1, 2], [3, 4]]]}]}
    b = {"inputs": [{**V2_FP32, "shape": [2, 2, 2], "data": [5, 6, 7, 8, 9, 10, 11, 12]}]}
    members = [parse("v2", a), parse("v2", b)]
    assert all(isinstance(m, Rows) for m in members)
    merged = merge("v2", members, a)
    assert merged == {
        "inputs": [{**V2_FP32, "shape": [3, 2, 2], "data": list(range(1, 13))}],
    }
    answer = {
        "model_name": "m",
        "model_version": "2",
        "id": "the-pods-own",
        "outputs": [
            {"name": "p", "shape": [3, 2], "datatype": "FP32", "data": [[0, 1], [2, 3], [4, 5]]},
            {"name": "s", "shape": [3], "datatype": "FP32", "data": [10, 11, 12]},
        ],
    }
    assert split("v2", answer, members) == [
        {"model_name": "m", "model_version": "2", "id": "a", "outputs": [
            {"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]},
            {"name": "s", "shape": [1], "datatype": "FP32", "data": [10]}]},
        {"model_name": "m", "model_version": "2", "outputs": [
            {"name": "p", "shape": [2, 2], "datatype": "FP32", "data": [2, 3, 4, 5]},
            {"name": "s", "shape": [2], "datatype": "FP32", "data": [11, 12]}]},
    ]  # fmt: skip


def test_v1_merge_concatenates_instances_and_split_cuts_predictions() -> None:
    members = [parse("v1", {"instances": [[1], [2]]}), parse("v1", {"instances": [[3]]})]
    assert merge("v1", members, {}) == {"instances": [[1], [2], [3]]}
    assert split("v1", {"predictions": ["a", "b", "c"]}, members) == [
        {"predictions": ["a", "b"]},
        {"predictions": ["c"]},
    ]


BAD_BATCH_ANSWERS = [
    pytest.param("v1", {"predictions": [1, 2]}, id="v1-too-few-predictions"),
    pytest.param("v1", ["not", "an", "object"], id="v1-not-an-object"),
    pytest.param("v2", {"model_name": "m"}, id="v2-no-outputs"),
    pytest.param("v2", {"outputs": [{"name": "o", "shape": [1], "data": [1]}]},
                 id="v2-output-not-batched"),
    pytest.param("v2", {"outputs": [{"name": "o", "shape": [3, 2], "data": [1, 2]}]},
                 id="v2-output-data-short"),
]  # fmt: skip


@pytest.mark.parametrize(("protocol", "answer"), BAD_BATCH_ANSWERS)
async def test_an_answer_that_cannot_be_split_is_502_for_every_member(
    protocol: str, answer: object
) -> None:
    variant = V1 if protocol == "v1" else V2

    async def pod(p: str, body: dict) -> tuple[int, dict]:
        return 200, answer

    async with MicroBatcher(3, FAR_MS, pod) as batcher:
        results = await asyncio.gather(
            batcher.submit(protocol, make_payload(0, 1, variant)),
            batcher.submit(protocol, make_payload(1, 2, variant)),
        )
    assert [status for status, _ in results] == [502, 502]
    assert all("bad answer to a batch" in body["error"] for _, body in results)


# ---- errors, cancellation, shutdown -----------------------------------------------------


async def test_a_pod_error_is_every_members_answer() -> None:
    pod = FakePod(status=400)
    async with MicroBatcher(4, FAR_MS, pod) as batcher:
        results = await asyncio.gather(
            *(batcher.submit("v2", make_payload(r, 2, V2, rid=f"r{r}")) for r in (0, 1))
        )
    assert results == [(400, {"error": "row 3 is not a number"})] * 2
    assert results[0][1] is not results[1][1], "each caller owns its body"
    assert pod.batches() == [[0, 1]]


async def test_a_send_exception_is_raised_from_every_submit() -> None:
    boom = ConnectionResetError("pod went away")
    async with MicroBatcher(4, FAR_MS, FakePod(raises=boom)) as batcher:
        results = await asyncio.gather(
            *(batcher.submit("v1", make_payload(r, 2)) for r in (0, 1)), return_exceptions=True
        )
    assert results == [boom, boom]
    assert no_other_tasks()


async def test_a_caller_gone_before_the_batch_leaves_takes_its_rows_with_it() -> None:
    clock, pod = FakeClock(), FakePod()
    async with MicroBatcher(5, 10, pod, clock=clock) as batcher:
        gone = asyncio.create_task(batcher.submit("v1", make_payload(0, 3)))
        stays = asyncio.create_task(batcher.submit("v1", make_payload(1, 1)))
        await settle()
        gone.cancel()
        await settle()
        assert batcher.pending_rows == 1
        # Rows freed by the cancel make room: without them this request would not fit.
        joins = asyncio.create_task(batcher.submit("v1", make_payload(2, 4)))
        await settle()
        assert pod.batches() == [[1, 2]]
        assert await stays == (200, pod_answer("v1", make_payload(1, 1)))
        assert await joins == (200, pod_answer("v1", make_payload(2, 4)))
    assert gone.cancelled()
    assert batcher.rows_sent == 5


async def test_a_caller_gone_while_its_batch_is_at_the_pod_does_not_disturb_the_rest() -> None:
    pod = FakePod()
    gate = pod.hold()
    async with MicroBatcher(4, FAR_MS, pod) as batcher:
        tasks = [asyncio.create_task(batcher.submit("v1", make_payload(r, 2))) for r in (0, 1)]
        await settle()
        assert pod.batches() == [[0, 1]]
        tasks[0].cancel()
        await settle()
        gate.set()
        assert await tasks[1] == (200, pod_answer("v1", make_payload(1, 2)))
    assert tasks[0].cancelled()
    assert no_other_tasks()


async def test_when_every_caller_leaves_an_open_batch_nothing_is_sent() -> None:
    clock, pod = FakeClock(), FakePod()
    async with MicroBatcher(4, 10, pod, clock=clock) as batcher:
        tasks = [asyncio.create_task(batcher.submit("v1", make_payload(r, 1))) for r in (0, 1)]
        await settle()
        for task in tasks:
            task.cancel()
        await settle()
        clock.now += 1.0
        batcher.flush_due()
        await settle()
        assert batcher.pending_rows == 0
    assert pod.received == [] and batcher.batches_sent == 0


async def test_close_sends_what_is_open_then_refuses() -> None:
    clock, pod = FakeClock(), FakePod()
    batcher = MicroBatcher(8, FAR_MS, pod, clock=clock)
    task = asyncio.create_task(batcher.submit("v1", make_payload(0, 2)))
    await settle()
    await batcher.close()
    assert await task == (200, pod_answer("v1", make_payload(0, 2)))
    await batcher.close()  # idempotent
    with pytest.raises(BatcherClosed):
        await batcher.submit("v1", make_payload(1, 1))
    assert no_other_tasks()


async def test_close_with_a_timeout_aborts_a_batch_the_pod_never_answers() -> None:
    pod = FakePod()
    pod.hold()
    batcher = MicroBatcher(2, FAR_MS, pod)
    tasks = [asyncio.create_task(batcher.submit("v1", make_payload(r, 1))) for r in (0, 1)]
    await settle()
    await batcher.close(timeout=0.01)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(r) for r in results] == [BatchAborted, BatchAborted]
    assert no_other_tasks()


def test_configuration_is_checked_once_and_a_spec_without_batching_gets_none() -> None:
    async def pod(p: str, body: dict) -> tuple[int, dict]:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(0, 5, pod)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(4, -1, pod)
    assert MicroBatcher.for_spec(BatchingSpec(), pod) is None
    batcher = MicroBatcher.for_spec(BatchingSpec(max_batch_size=16, max_wait_ms=2.5), pod)
    assert batcher is not None and batcher.max_batch_size == 16 and batcher.max_wait_s == 0.0025


# ---- the invariants, for any traffic ----------------------------------------------------


@dataclass(frozen=True)
class Req:
    variant: Variant
    rows: int
    nested: bool
    with_id: bool


requests = st.builds(
    Req, st.sampled_from(VARIANTS), st.integers(1, 6), st.booleans(), st.booleans()
)
# Waves of requests arriving in the same instant; after each, either more come at once or
# the window closes.
traffic = st.lists(st.tuples(st.lists(requests, min_size=1, max_size=6), st.booleans()),
                   min_size=1, max_size=5)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_rows=st.integers(1, 8), eager=st.booleans(), waves=traffic)
def test_batched_answers_equal_answers_alone(
    max_rows: int, eager: bool, waves: list[tuple[list[Req], bool]]
) -> None:
    asyncio.run(check_batched_traffic(max_rows, eager, waves))


async def check_batched_traffic(
    max_rows: int, eager: bool, waves: list[tuple[list[Req], bool]]
) -> None:
    clock, pod = FakeClock(), FakePod()
    payloads: list[tuple[str, dict]] = []
    tasks: list[asyncio.Task] = []
    async with MicroBatcher(max_rows, FAR_MS, pod, clock=clock, eager=eager) as batcher:
        for wave, window_closes in waves:
            for req in wave:
                i = len(payloads)
                rid = f"req-{i}" if req.with_id else None
                payload = make_payload(i, req.rows, req.variant, nested=req.nested, rid=rid)
                payloads.append((req.variant.protocol, payload))
                tasks.append(asyncio.create_task(batcher.submit(req.variant.protocol, payload)))
            await settle()
            if window_closes:
                clock.now += FAR_MS / 1000.0
                batcher.flush_due()
                await settle()
    answers = [await t for t in tasks]

    # Every caller gets exactly what it would have got alone.
    assert answers == [(200, pod_answer(p, body)) for p, body in payloads]
    # Every row reached the pod exactly once.
    sent = Counter((r[0], r[1]) for p, body in pod.received for r in rows_of(p, body))
    assert sent == Counter((i, r) for i, (p, body) in enumerate(payloads)
                           for r in range(len(rows_of(p, body))))  # fmt: skip
    for protocol, body in pod.received:
        rows = rows_of(protocol, body)
        members = {r[0] for r in rows}
        # Never over max_batch_size rows, unless one request was bigger on its own.
        assert len(rows) <= max_rows or len(members) == 1
        # One protocol and one signature per batch.
        (code,) = {r[2] for r in rows}
        assert VARIANTS[code].protocol == protocol
    assert batcher.batches_sent == len(pod.received)
    assert batcher.rows_sent == sum(sent.values())
    assert batcher.max_rows_in_a_batch == max(len(rows_of(p, b)) for p, b in pod.received)
    assert no_other_tasks()


# ---- with the sample model's real math --------------------------------------------------


async def test_split_answers_equal_the_sample_model_on_each_request_alone() -> None:
    model = load_model()

    async def pod(protocol: str, body: dict) -> tuple[int, dict]:
        # As examples/sample/server.py decodes and answers.
        if protocol == "v1":
            probs = model.predict(np.asarray(body["instances"], dtype=np.float64))
            return 200, {"predictions": probs.tolist()}
        tensor = body["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        probs = model.predict(x)
        answer: dict = {"model_name": "sample", "model_version": "1"}
        if "id" in body:
            answer["id"] = body["id"]
        answer["outputs"] = [{"name": "output-0", "shape": list(probs.shape),
                              "datatype": "FP32", "data": probs.ravel().tolist()}]  # fmt: skip
        return 200, answer

    rng = np.random.default_rng(4)
    counts = [1, 3, 2, 5, 1, 4, 2, 1]
    inputs = [rng.normal([5.8, 3.0, 3.8, 1.2], [0.8, 0.4, 1.7, 0.7], (n, 4)) for n in counts]
    clock = FakeClock()
    async with MicroBatcher(8, FAR_MS, pod, clock=clock) as batcher:
        v2 = []
        for i, x in enumerate(inputs):
            data = x.tolist() if i % 2 else x.ravel().tolist()
            payload: dict = {"id": f"q{i}"} if i % 3 else {}
            payload["inputs"] = [{"name": "input-0", "shape": list(x.shape),
                                  "datatype": "FP32", "data": data}]  # fmt: skip
            v2.append(asyncio.create_task(batcher.submit("v2", payload)))
        v1 = [asyncio.create_task(batcher.submit("v1", {"instances": x.tolist()})) for x in inputs]
        await settle()
        clock.now += FAR_MS / 1000.0
        batcher.flush_due()
        v2_answers = await asyncio.gather(*v2)
        v1_answers = await asyncio.gather(*v1)
    assert batcher.batches_sent < 2 * len(inputs), "some requests must have been merged"
    assert batcher.max_rows_in_a_batch <= 8

    for i, (x, (status, answer)) in enumerate(zip(inputs, v2_answers, strict=True)):
        alone = model.predict(x.astype(np.float32))
        assert status == 200
        assert answer.get("id") == (f"q{i}" if i % 3 else None)
        (out,) = answer["outputs"]
        assert out["shape"] == list(alone.shape) and out["name"] == "output-0"
        np.testing.assert_allclose(out["data"], alone.ravel(), rtol=1e-6, atol=1e-7)
    for x, (status, answer) in zip(inputs, v1_answers, strict=True):
        assert status == 200
        np.testing.assert_allclose(answer["predictions"], model.predict(x), rtol=1e-6, atol=1e-7)
