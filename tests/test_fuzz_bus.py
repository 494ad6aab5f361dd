"""Every NATS conversation (kernel/endpoints.py `ALL`) fed hypothesis-made payloads — random
bytes, random JSON and msgpack, and messages shaped like the endpoint's request type with
wrong-typed or extreme values — by a client logged in as a kind allowed to send them, against
a stack with its own secured nats-server and Redis. What must hold: a request is answered,
with the reply type or a typed error (kernel/errors.py), never left to time out; no
component's background task dies and every component stays connected; the buses count what
they refused (`rejected`); and afterwards the stack still serves a cold start with 200.

Hypothesis runs on a worker thread (it is synchronous) and hands each send to the stack's
loop. Strings come from a fixed pool of awkward values, never free text: a `StartPod` that
passes the node's checks would run its `command` on this machine."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from controlplane.stack import Stack
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.identity import KINDS, Credentials, Login, login
from kernel.messages import ErrorReply
from tests.stackutil import deploy, sample_spec, stack_config

EXAMPLES_PER_ENDPOINT = 150
REPLY_TIMEOUT_S = 5.0
PARAMS = {"node": "node-0", "service": "fuzzed", "partition": "0", "shard": "0"}
REPO = Path(__file__).resolve().parent.parent
BODY = json.loads((REPO / "examples" / "sample" / "request_v2.json").read_text())

INTS = [0, 1, -1, 2**31, -(2**31), 2**63 - 1, -(2**63), 2**64 - 1]
FLOATS = [0.0, -0.0, -1.0, 1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324]
STRINGS = ["", " ", "*", ">", "a.b", "node-0", "x" * 2000, "\x00", "ü", "-1", "../x"]
WRONG = [None, True, [], {}, "", 0, 1.5, b"\x00"]


def shaped(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    """A value for type `t`: usually of that type but extreme, sometimes of a wrong type."""
    mi = msgspec.inspect
    wrong = st.sampled_from(WRONG)
    match t:
        case mi.StructType():
            return struct_dict(t)
        case mi.IntType():
            right: st.SearchStrategy[Any] = st.sampled_from(INTS)
        case mi.FloatType():
            right = st.sampled_from(FLOATS)
        case mi.StrType():
            right = st.sampled_from(STRINGS)
        case mi.BoolType():
            right = st.booleans()
        case mi.NoneType():
            right = st.none()
        case mi.LiteralType():
            right = st.sampled_from(list(t.values))
        case mi.EnumType():
            right = st.sampled_from([m.value for m in t.cls])
        case mi.ListType() | mi.SetType() | mi.FrozenSetType() | mi.VarTupleType():
            right = st.lists(shaped(t.item_type), max_size=3)
        case mi.DictType():
            right = st.dictionaries(st.sampled_from(STRINGS), shaped(t.value_type), max_size=3)
        case mi.UnionType():
            right = st.one_of([shaped(x) for x in t.types])
        case _:
            right = wrong
    return st.one_of(right, right, right, wrong)


def struct_dict(t: msgspec.inspect.StructType) -> st.SearchStrategy[dict[str, Any]]:
    required = {f.encode_name: shaped(f.type) for f in t.fields if f.required}
    optional = {f.encode_name: shaped(f.type) for f in t.fields if not f.required}
    if t.tag_field is not None:
        required[t.tag_field] = st.just(t.tag)
    return st.fixed_dictionaries(required, optional=optional)


def typed_payloads(request: Any) -> st.SearchStrategy[bytes]:
    if request is bytes:
        return st.nothing()
    shape = msgspec.inspect.type_info(request)
    return shaped(shape).map(msgspec.msgpack.encode)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


# Well-formed messages that only their one authority may send (kernel/identity.py): a
# partition map from the coordinator's credentials is believed, so an absurd but well-formed
# one (version 2**63-1, bogus partitions) leaves `schedule` owning nothing and every later,
# real map "older" — cold starts then fail with "no schedule instance owns a partition".
# Garbage on them is still sent and must be refused.
TRUSTED_STATE = (ep.PARTITION_MAP,)


def payloads(endpoint: ep.Endpoint[Any, Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        JSONISH.map(lambda v: json.dumps(v).encode()),
        JSONISH.map(msgspec.msgpack.encode),
        st.nothing() if endpoint in TRUSTED_STATE else typed_payloads(endpoint.request),
    )


def sender(endpoint: ep.Endpoint[Any, Any]) -> str:
    return next(k for k in endpoint.called_by if k in KINDS)


def subject(endpoint: ep.Endpoint[Any, Any], kind: str) -> str:
    return endpoint.subject_for(**{p: (kind if p == "kind" else PARAMS[p])
                                   for p in endpoint.params})


def matches(pattern: str, concrete: str) -> bool:
    want, got = pattern.split("."), concrete.split(".")
    for i, w in enumerate(want):
        if w == ">":
            return len(got) > i
        if i >= len(got) or (w != "*" and w != got[i]):
            return False
    return len(want) == len(got)


def buses(stack: Stack) -> list[Bus]:
    components = list(stack.components)
    runtime = stack.runtime
    for group in getattr(runtime, "running", {}).values():
        components.extend(group)
    return [c.bus for c in components]


NODES = {"node-0", "node-1"}


def asked_of_others(endpoint: ep.Endpoint[Any, Any], payload: bytes) -> bool:
    """A well-formed scatter-gather inventory request naming none of our nodes: by design
    no agent answers it (its caller gathers with a deadline); malformed ones are refused."""
    if endpoint is not ep.NODE_INVENTORY:
        return False
    try:
        msg = msgspec.msgpack.decode(payload, type=endpoint.request)
    except (msgspec.MsgspecError, ValueError):
        return False
    return not NODES & set(msg.nodes)


class Outcome:
    def __init__(self) -> None:
        self.replies: dict[str, int] = {}
        self.errors: dict[str, set[str]] = {}
        self.unserved: set[str] = set()


async def send(nc: Client, endpoint: ep.Endpoint[Any, Any], subj: str, payload: bytes,
               outcome: Outcome) -> None:
    if endpoint.reply is None or asked_of_others(endpoint, payload):
        await nc.publish(subj, payload)
        return
    try:
        reply = await nc.request(subj, payload, timeout=REPLY_TIMEOUT_S)
    except nats.errors.NoRespondersError:
        outcome.unserved.add(endpoint.name)
        return
    # A timeout propagates: a request nobody answers is the failure this test looks for.
    outcome.replies[endpoint.name] = outcome.replies.get(endpoint.name, 0) + 1
    if endpoint.reply is bytes:  # the inference ingress answers as HTTP would
        assert reply.headers and "Fnplane-Status" in reply.headers, reply
        return
    answer = msgspec.msgpack.decode(reply.data, type=endpoint.reply | ErrorReply)
    if isinstance(answer, ErrorReply):
        outcome.errors.setdefault(endpoint.name, set()).add(str(answer.code))


def fuzz_all(run: Callable[[Any], Any], sessions: dict[str, Client],
             targets: list[ep.Endpoint[Any, Any]], outcome: Outcome) -> None:
    for endpoint in targets:
        kind = sender(endpoint)
        fuzz_one(run, sessions[kind], endpoint, subject(endpoint, kind), outcome)


def fuzz_one(run: Callable[[Any], Any], nc: Client, endpoint: ep.Endpoint[Any, Any],
             subj: str, outcome: Outcome) -> None:
    @given(payload=payloads(endpoint))
    @settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(payload: bytes) -> None:
        run(send(nc, endpoint, subj, payload, outcome))

    check()


async def test_every_endpoint_survives_hostile_payloads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    stack = Stack(stack_config(tmp_path / "state"), nats_port=None)  # its own secured servers
    await stack.start()
    sessions: dict[str, Client] = {}
    try:
        assert stack.nats_url is not None and stack.config.credentials is not None
        creds = Credentials.load(stack.config.credentials)
        targets = list(ep.ALL)
        for kind in {sender(e) for e in targets}:
            sessions[kind] = await nats.connect(
                stack.nats_url, allow_reconnect=False,
                **Login(kind, creds.passwords[kind]).nats_options())
        loop = asyncio.get_running_loop()
        all_buses = buses(stack)
        background = {id(b): b for b in all_buses}
        names_before = {c.id: c.tasks.names() for c in stack.components}
        outcome = Outcome()

        # Never valid msgpack (0xc1 is unused) nor JSON: every bus-served endpoint refuses it.
        for e in targets:
            await send(sessions[sender(e)], e, subject(e, sender(e)), b"\xc1", outcome)

        def run(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(REPLY_TIMEOUT_S + 5)

        await asyncio.to_thread(fuzz_all, run, sessions, targets, outcome)
        for nc in sessions.values():
            await nc.flush()
        await asyncio.sleep(0.5)  # publications still being handled

        served = {e.name for e in targets for b in all_buses for s in b._subs
                  if matches(s.subject, subject(e, sender(e)))}
        rejected = {name for b in all_buses for name, n in b.rejected.items() if n}
        connected = {b.name: b.nc.is_connected for b in background.values()}
        names_after = {c.id: c.tasks.names() for c in stack.components}

        # And the stack still serves a cold start.
        await deploy(stack.nats_url, sample_spec(), login(stack.config.credentials, "admin"))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/sample/infer", json=BODY,
                                 timeout=aiohttp.ClientTimeout(total=60)) as r:
                cold = r.status, await r.text()
    finally:
        for nc in sessions.values():
            await nc.close()
        await stack.stop()

    requests = {e.name for e in targets if e.reply is not None} - outcome.unserved
    assert requests and all(outcome.replies.get(n, 0) > 1 for n in requests), outcome.replies
    assert served <= rejected, f"served but never counted a refusal: {served - rejected}"
    assert all(connected.values()), connected
    for cid, names in names_before.items():
        lost = set(names) - set(names_after.get(cid, []))
        assert not lost, f"{cid}: background tasks gone: {lost}"
    crashed = [r.getMessage() for r in caplog.records if r.name == "kernel.tasks"]
    assert not crashed, crashed
    # A handler's unexpected exception (a publication's too, which nobody hears of).
    failed = sorted({r.getMessage() for r in caplog.records
                     if r.name == "kernel.bus" and r.levelno >= logging.ERROR})
    assert not failed, failed
    internal = {n: codes for n, codes in outcome.errors.items() if "internal" in codes}
    assert not internal, f"handlers failed with unexpected exceptions: {internal}"
    assert cold[0] == 200, cold
