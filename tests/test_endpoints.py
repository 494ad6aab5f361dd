"""The endpoint declarations and the typed bus over a real nats-server: a handler gets only
its declared request type; anything else is counted and answered with a typed error, never
dropped in silence; subjects are built from templates and refuse a parameter that would
address another subject."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import msgspec
import pytest
from nats.aio.msg import Msg

from kernel import endpoints as ep
from kernel.bus import ERROR_CODE_HEADER, Bus
from kernel.errors import HTTP_STATUS, ErrorCode, RemoteError
from kernel.messages import (
    TAGGED,
    Empty,
    NameRequest,
    PartitionMap,
    SpecUpdated,
    StopPod,
    encode,
)


def test_every_endpoint_has_a_unique_name_and_subject() -> None:
    names = [e.name for e in ep.ALL]
    subjects = [e.subject for e in ep.ALL]

    assert len(set(names)) == len(names)
    assert len(set(subjects)) == len(subjects)


def test_every_request_and_reply_type_is_a_tagged_message() -> None:
    for e in ep.ALL:
        for t in (e.request, e.reply):
            if t is None or t is bytes:
                continue
            members = getattr(t, "__args__", (t,))
            assert all(m in TAGGED for m in members), (e.name, t)


@pytest.mark.parametrize(
    ("endpoint", "params", "subject"),
    [
        (ep.NODE_START, {"node": "node-0"}, "fnplane.node.node-0.start"),
        (ep.NODE_START, {}, "fnplane.node.*.start"),
        (ep.RESERVE, {"partition": 3}, "fnplane.pod.reserve.3"),
        (ep.INVOKE, {"service": "sample"}, "svc.invoke.sample"),
        (ep.DEMAND, {}, "fnplane.service.demand.*"),
        (ep.DEMAND, {"shard": 7}, "fnplane.service.demand.7"),
    ],
)
def test_subjects_come_from_templates(
    endpoint: ep.Endpoint[object, object], params: dict[str, str | int], subject: str
) -> None:
    assert endpoint.subject_for(**params) == subject
    assert endpoint.params_of(subject) == ({k: str(v) for k, v in params.items()}
                                           if params else endpoint.params_of(subject))


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a b", ""])
def test_a_parameter_that_is_not_one_token_is_refused(bad: str) -> None:
    with pytest.raises(ep.SubjectError):
        ep.NODE_START.subject_for(node=bad)


def test_an_unknown_parameter_is_refused() -> None:
    with pytest.raises(ep.SubjectError):
        ep.DEMAND.subject_for(service="x")


def test_every_error_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert HTTP_STATUS[ErrorCode.STALE_EPOCH] == HTTP_STATUS[ErrorCode.CONFLICT] == 409


async def test_a_payload_of_the_wrong_type_is_counted_and_answered_invalid(nats_url: str) -> None:
    server = await Bus.connect(nats_url, "server")
    client = await Bus.connect(nats_url, "client")
    seen: list[NameRequest] = []

    async def on_spec(msg: NameRequest, _raw: Msg) -> SpecUpdated:
        seen.append(msg)
        raise RemoteError(ErrorCode.NOT_FOUND, f"no {msg.name}")

    try:
        await server.serve(ep.ADMIN_SPEC, on_spec)
        await client.nc.flush()
        # A StopPod where a NameRequest is declared: refused before the handler runs.
        raw = await client.nc.request(
            ep.ADMIN_SPEC.subject_for(), encode(StopPod(pod="p", service="s")), timeout=2
        )
        with pytest.raises(RemoteError) as wrong:
            await client.call(ep.ADMIN_SPEC, StopPod(pod="p", service="s"))
        with pytest.raises(RemoteError) as missing:
            await client.call(ep.ADMIN_SPEC, NameRequest(name="nope"))
    finally:
        await client.close()
        await server.close()

    assert raw.headers is not None and raw.headers[ERROR_CODE_HEADER] == "400"
    assert wrong.value.code is ErrorCode.INVALID and "NameRequest" in wrong.value.message
    assert missing.value.code is ErrorCode.NOT_FOUND and missing.value.status == 404
    assert [m.name for m in seen] == ["nope"]
    assert server.rejected["admin-spec"] == 2


async def test_garbage_on_a_publication_is_counted_not_dropped_silently(nats_url: str) -> None:
    # The session's NATS is shared: a coordinator another test left stopping may still
    # publish the real partition map, so this conversation gets a subject of its own.
    pmap = dataclasses.replace(ep.PARTITION_MAP, subject=f"test.{uuid.uuid4().hex}.map")
    server = await Bus.connect(nats_url, "server")
    client = await Bus.connect(nats_url, "client")
    got: list[PartitionMap] = []

    async def on_map(msg: PartitionMap, _raw: Msg) -> None:
        got.append(msg)

    try:
        await server.serve(pmap, on_map)
        await client.nc.publish(pmap.subject, b"\xc1garbage")
        await client.send(pmap, Empty())  # a real message of the wrong kind
        await client.send(pmap, PartitionMap(version=1, partitions=[]))
        await client.nc.flush()  # all three are on the server before we wait for them
        for _ in range(500):  # up to 10 s: a loaded 2-core machine has taken over 2
            if got and server.rejected["partition-map"] == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        await client.close()
        await server.close()

    # (what each side's connection counted, should this fail again in a full run)
    assert [m.version for m in got] == [1], (dict(server.rejected), server.nc.stats,
                                             client.nc.stats)
    assert server.rejected["partition-map"] == 2


async def test_a_reply_that_is_not_the_declared_type_is_an_error(nats_url: str) -> None:
    liar = await Bus.connect(nats_url, "liar")
    client = await Bus.connect(nats_url, "client")

    async def on_list(raw: Msg) -> None:
        await liar.nc.publish(raw.reply, msgspec.msgpack.encode(Empty()))

    try:
        await liar.nc.subscribe(ep.ADMIN_LIST.subject, cb=on_list)
        await liar.nc.flush()
        with pytest.raises(RemoteError) as err:
            await client.call(ep.ADMIN_LIST, Empty())
    finally:
        await client.close()
        await liar.close()

    assert err.value.code is ErrorCode.INTERNAL and "malformed reply" in err.value.message
