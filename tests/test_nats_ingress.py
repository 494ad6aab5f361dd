"""The activator's NATS ingress, end to end: the whole embedded stack against the session's
real nats-server (JetStream) and Redis, pods running the sample model. Request-reply on
`svc.invoke.{service}` must answer as HTTP does; events on `svc.events.{service}` must be
answered, acked only once a pod answered, and their consumer lag alone must wake a service
at zero."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from activator.nats_events import DURABLE, LAG_REPORTER, REPLY_TO_HEADER, stream_name
from activator.nats_ingress import STATUS_HEADER, VERSION_HEADER
from examples.sample.model import load_model
from kernel import endpoints as ep
from kernel.config import NatsIngressConfig
from kernel.messages import Demand, NameRequest, ScalingSpec
from tests.stackutil import REPO, admin, deploy, describe, running_stack, sample_spec, wait_until

MODEL = load_model()
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 4.4, 1.4]]
COLD_S = 30.0  # generous: a cold start on a loaded 2-core machine


def v2_body(rows: list[list[float]] = ROWS) -> bytes:
    tensor = {"name": "input-0", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}
    return json.dumps({"inputs": [tensor]}).encode()


def expected(rows: list[list[float]]) -> np.ndarray:
    return MODEL.predict(np.asarray(rows, dtype=np.float32))


def outputs(reply: Msg) -> np.ndarray:
    out = json.loads(reply.data)["outputs"][0]
    return np.asarray(out["data"]).reshape(out["shape"])


def status(reply: Msg) -> str:
    return (reply.headers or {}).get(STATUS_HEADER, "")


def row(i: int) -> list[float]:
    return [4.0 + i % 5, 3.0, 1.0 + i % 3, 0.5]


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    """A client connection; event streams are session-wide on the shared nats-server, so
    each test starts and ends without any."""
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await _delete_event_streams(js)
    try:
        yield client
    finally:
        await _delete_event_streams(js)
        await client.drain()


async def _delete_event_streams(js: JetStreamContext) -> None:
    for info in await js.streams_info():
        if info.config.name and info.config.name.startswith("FNPLANE_EV_"):
            await js.delete_stream(info.config.name)


async def consumer_ready(js: JetStreamContext, service: str) -> None:
    """The activator creates a service's stream on its deploy event; wait for it."""

    async def probe() -> bool:
        try:
            await js.consumer_info(stream_name(service), DURABLE)
        except NotFoundError:
            return False
        return True

    await wait_until(probe, bool, timeout=10, what=f"the event stream of {service}")


async def test_request_reply_v2_and_v1_from_zero_answer_with_the_model_output(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec())
        assert (await describe(nats_url, "sample")).ready_pods == 0
        proxy = stack.activator.proxy  # type: ignore[union-attr]
        sent_headers: list[dict[str, str]] = []
        forward = proxy.forward

        async def recording_forward(url, method, path, body, headers, **kw):  # type: ignore[no-untyped-def]
            sent_headers.append(dict(headers))
            return await forward(url, method, path, body, headers, **kw)

        proxy.forward = recording_forward  # type: ignore[method-assign]
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"

        reply = await nc.request(
            ep.INVOKE.subject_for(service="sample"),
            v2_body(),
            timeout=COLD_S,
            headers={"traceparent": traceparent},
        )
        assert status(reply) == "200", reply.data
        assert np.allclose(outputs(reply), expected(ROWS), atol=1e-6)
        # The caller's trace continues to the pod.
        assert sent_headers and sent_headers[0]["traceparent"].split("-")[1] == trace_id

        instances = json.loads((REPO / "examples/sample/request_v1.json").read_text())
        reply = await nc.request(
            ep.INVOKE.subject_for(service="sample"), json.dumps(instances).encode(), timeout=COLD_S
        )
        assert status(reply) == "200", reply.data
        preds = json.loads(reply.data)["predictions"]
        assert np.allclose(np.asarray(preds), expected(instances["instances"]), atol=1e-6)
        assert (await describe(nats_url, "sample")).ready_pods == 1


async def test_unknown_service_404_and_malformed_json_400_without_waking(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec())
        reply = await nc.request(ep.INVOKE.subject_for(service="nope"), v2_body(), timeout=10)
        assert status(reply) == "404"
        assert "nope" in json.loads(reply.data)["error"]

        for bad, says in ((b"{not json", "JSON"), (b'{"x": 1}', "inputs"), (b"[1, 2]", "inputs")):
            reply = await nc.request(ep.INVOKE.subject_for(service="sample"), bad, timeout=10)
            assert status(reply) == "400", (bad, reply.data)
            assert says in json.loads(reply.data)["error"]

        # Bad input never reached the gateway's request path, so nothing woke the service.
        gw = stack.activator  # type: ignore[union-attr]
        assert gw.metrics.value("fnplane_revision_requests_total", kn_service_name="sample") == 0
        st = await describe(nats_url, "sample")
        assert st.pods == [] and st.desired_pods == 0


async def test_a_model_version_header_pins_the_version_as_a_versioned_path_does(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, sample_spec(model_version="5"))
        proxy = stack.activator.proxy  # type: ignore[union-attr]
        paths: list[str] = []
        forward = proxy.forward

        async def recording_forward(url, method, path, body, headers, **kw):  # type: ignore[no-untyped-def]
            paths.append(path)
            return await forward(url, method, path, body, headers, **kw)

        proxy.forward = recording_forward  # type: ignore[method-assign]
        subject = ep.INVOKE.subject_for(service="sample")
        wrong = await nc.request(subject, v2_body(), timeout=10,
                                 headers={VERSION_HEADER: "1"})
        assert paths == [], "an unknown version must not wake the service"
        pinned = await nc.request(subject, v2_body(), timeout=COLD_S,
                                  headers={VERSION_HEADER: "5"})
        unpinned = await nc.request(subject, v2_body(), timeout=COLD_S)

    assert status(wrong) == "404"
    assert "version 1 does not exist" in json.loads(wrong.data)["error"]
    assert (status(pinned), status(unpinned)) == ("200", "200"), (pinned.data, unpinned.data)
    assert json.loads(pinned.data)["model_version"] == "5"
    assert np.allclose(outputs(pinned), expected(ROWS), atol=1e-6)
    assert paths == ["/v2/models/sample/versions/5/infer", "/v2/models/sample/infer"]


async def test_50_concurrent_requests_at_zero_are_all_answered(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path):
        await deploy(nats_url, sample_spec(env={"SAMPLE_LATENCY_MS": "20"}))

        async def one(i: int) -> Msg:
            return await nc.request(
                ep.INVOKE.subject_for(service="sample"), v2_body([row(i)]), timeout=COLD_S
            )

        started = time.monotonic()
        replies = await asyncio.gather(*(one(i) for i in range(50)))
        assert [status(r) for r in replies] == ["200"] * 50
        for i, reply in enumerate(replies):
            assert np.allclose(outputs(reply), expected([row(i)]), atol=1e-6)
        # One at a time, 50 × 20 ms of model latency alone would be a full second on a
        # warm pod; concurrently it is one cold start plus a few rounds.
        assert time.monotonic() - started < COLD_S


async def test_events_at_zero_are_answered_and_acked_only_after_the_pod_answered(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    js = nc.jetstream()
    # A slow start keeps the events waiting long enough to see them delivered but unacked.
    spec = sample_spec(env={"SAMPLE_STARTUP_DELAY_MS": "1000"})
    async with running_stack(nats_url, redis_url, tmp_path):
        await deploy(nats_url, spec)
        await consumer_ready(js, "sample")
        inbox = nc.new_inbox()
        replies: dict[str, Msg] = {}

        async def on_reply(msg: Msg) -> None:
            replies[msg.subject] = msg

        await nc.subscribe(f"{inbox}.>", cb=on_reply)
        for i in range(20):
            await js.publish(
                ep.EVENTS.subject_for(service="sample"),
                v2_body([row(i)]),
                headers={REPLY_TO_HEADER: f"{inbox}.{i}"},
            )
        await js.publish(
            ep.EVENTS.subject_for(service="sample"),
            b"{oops",
            headers={REPLY_TO_HEADER: f"{inbox}.bad"},
        )

        def answered() -> int:  # the bad event is answered at once, without a pod
            return sum(1 for subject in replies if not subject.endswith(".bad"))

        seen_unacked = False
        deadline = time.monotonic() + COLD_S
        while len(replies) < 21:
            assert time.monotonic() < deadline, f"only {len(replies)} answers arrived"
            before = answered()
            info = await js.consumer_info(stream_name("sample"), DURABLE)
            if before == 0 and answered() == 0 and (info.num_ack_pending or 0) > 0:
                seen_unacked = True  # delivered to the activator, no model answer yet
            await asyncio.sleep(0.05)
        assert seen_unacked, "events were acked before any pod answered"

        for i in range(20):
            reply = replies[f"{inbox}.{i}"]
            assert status(reply) == "200", reply.data
            assert np.allclose(outputs(reply), expected([row(i)]), atol=1e-6)
        bad = replies[f"{inbox}.bad"]
        assert status(bad) == "400" and "JSON" in json.loads(bad.data)["error"]

        info = await wait_until(
            lambda: js.consumer_info(stream_name("sample"), DURABLE),
            lambda i: i.num_ack_pending == 0 and i.num_pending == 0,
            timeout=10,
            what="every event acked (or terminated)",
        )
        assert info.num_redelivered == 0
        # A work queue: served events do not stay behind in the stream.
        assert (await js.stream_info(stream_name("sample"))).state.messages == 0


async def test_consumer_lag_alone_scales_a_service_from_zero(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    """No worker fetches events here, and nobody calls the service: if the lag were not
    reported as demand, nothing would ask for a pod."""
    js = nc.jetstream()
    paused = NatsIngressConfig(consume_events=False)
    async with running_stack(nats_url, redis_url, tmp_path, nats=paused) as stack:
        await deploy(nats_url, sample_spec())
        await consumer_ready(js, "sample")
        assert (await describe(nats_url, "sample")).pods == []
        demands: list[Demand] = []

        async def on_demand(msg: Demand, _raw: Msg) -> None:
            if msg.service == "sample-00001":  # the lag wakes the service's revision
                demands.append(msg)

        async with admin(nats_url) as bus:
            await bus.serve(ep.DEMAND, on_demand)
            for i in range(5):
                await js.publish(ep.EVENTS.subject_for(service="sample"), v2_body([row(i)]))
            st = await wait_until(
                lambda: describe(nats_url, "sample"),
                lambda s: len(s.pods) >= 1,
                timeout=COLD_S,
                what="a pod for the waiting events",
            )
        assert st.pods[0].service == "sample-00001"
        from_lag = [d for d in demands if d.reporter == LAG_REPORTER]
        assert any(d.buffered == 5 and d.urgent for d in from_lag), demands
        gw = stack.activator  # type: ignore[union-attr]
        assert not [d for d in demands if d.reporter == gw.id and d.buffered], demands
        info = await js.consumer_info(stream_name("sample"), DURABLE)
        assert info.num_pending == 5  # nobody consumed them: the demand came from lag


async def test_event_for_a_service_that_fails_to_start_is_retried_then_given_up(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    js = nc.jetstream()
    cfg = NatsIngressConfig(max_deliver=2, nak_delay_s=0.2, nak_max_delay_s=0.5)
    async with running_stack(nats_url, redis_url, tmp_path, nats=cfg, request_timeout_s=8):
        await deploy(nats_url, sample_spec("broken", env={"SAMPLE_FAIL_ON_START": "1"}))
        await consumer_ready(js, "broken")
        inbox = nc.new_inbox()
        replies: list[Msg] = []
        sub = await nc.subscribe(inbox, cb=functools.partial(_append, replies))
        await js.publish(
            ep.EVENTS.subject_for(service="broken"), v2_body(), headers={REPLY_TO_HEADER: inbox}
        )
        info = await wait_until(
            lambda: js.consumer_info(stream_name("broken"), DURABLE),
            lambda i: i.delivered.consumer_seq >= 2 and i.num_ack_pending == 0,
            timeout=COLD_S,
            what="the event delivered twice, then terminated",
        )
        assert info.num_pending == 0 and info.delivered.consumer_seq == 2
        await wait_until(lambda: _count(replies), bool, timeout=5, what="the final answer")
        await sub.unsubscribe()
        assert len(replies) == 1, "the reply subject hears the final outcome only"
        assert status(replies[0]) == "503"
        assert replies[0].headers.get("Retry-After") == "1"
        assert json.loads(replies[0].data)["error"]


async def _append(into: list[Msg], msg: Msg) -> None:
    into.append(msg)


async def _count(items: list[Msg]) -> int:
    return len(items)


async def test_a_flood_of_events_cannot_fill_the_buffer(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    """Buffer of 4: events take at most half of it, so a caller still gets in while a
    flood waits for a cold start, and the rest of the flood stays in the stream."""
    js = nc.jetstream()
    spec = sample_spec(env={"SAMPLE_STARTUP_DELAY_MS": "1000"})
    async with running_stack(nats_url, redis_url, tmp_path, buffer_size=4) as stack:
        await deploy(nats_url, spec)
        await consumer_ready(js, "sample")
        inbox = nc.new_inbox()
        replies: list[Msg] = []
        await nc.subscribe(f"{inbox}.>", cb=functools.partial(_append, replies))
        for i in range(12):
            await js.publish(
                ep.EVENTS.subject_for(service="sample"),
                v2_body([row(i)]),
                headers={REPLY_TO_HEADER: f"{inbox}.{i}"},
            )
        thr = stack.activator.services["sample-00001"].throttler  # type: ignore[union-attr]
        info = await wait_until(
            lambda: js.consumer_info(stream_name("sample"), DURABLE),
            lambda i: (i.num_ack_pending or 0) > 0,
            timeout=10,
            what="the first events delivered",
        )
        assert not replies, "the pod cannot have answered yet"
        assert info.num_ack_pending <= 2 and thr.buffered <= 2, (info, thr.buffered)
        # The caller finds room in the buffer beside the waiting events.
        reply = await nc.request(ep.INVOKE.subject_for(service="sample"), v2_body(), timeout=COLD_S)
        assert status(reply) == "200", reply.data
        await wait_until(
            lambda: _count(replies), lambda n: n == 12, timeout=COLD_S, what="every event answered"
        )
        assert sorted(status(r) for r in replies) == ["200"] * 12
        assert thr.violations == 0


async def test_a_full_stream_refuses_new_events_and_goes_with_its_service(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    """Nobody consumes here, so events pile up to the byte limit: past it the publisher's
    ack is an error, and the events already taken stay (none silently dropped). Deleting
    the service deletes its stream."""
    js = nc.jetstream()
    limit = 8 * 1024
    paused = NatsIngressConfig(consume_events=False, stream_max_bytes=limit)
    body = v2_body([row(i) for i in range(12)])  # ~1 KiB with headers
    async with running_stack(nats_url, redis_url, tmp_path, nats=paused):
        await deploy(nats_url, sample_spec("full", scaling=ScalingSpec(max_scale=1)))
        await consumer_ready(js, "full")
        taken, refusal = 0, ""
        for _ in range(3 * limit // len(body)):
            try:
                await js.publish(ep.EVENTS.subject_for(service="full"), body)
            except nats.js.errors.APIError as exc:
                refusal = str(exc)
                break
            taken += 1
        state = (await js.stream_info(stream_name("full"))).state
        assert "maximum bytes" in refusal, refusal
        assert 0 < taken < 3 * limit // len(body)
        assert state.messages == taken and state.bytes <= limit
        assert state.first_seq == 1, "older events were dropped to make room"

        async with admin(nats_url) as bus:
            await bus.call(ep.ADMIN_DELETE, NameRequest(name="full"), timeout=5)
        await wait_until(lambda: _stream_exists(js, "full"), lambda there: not there,
                         timeout=10, what="the deleted service's stream gone")


async def _stream_exists(js: JetStreamContext, service: str) -> bool:
    try:
        await js.stream_info(stream_name(service))
    except NotFoundError:
        return False
    return True


async def test_an_earlier_releases_stream_is_served_first_then_becomes_a_work_queue(
    nats_url: str, redis_url: str, tmp_path: Path, nc: NATS
) -> None:
    """JetStream cannot change a stream's retention: a limits stream left by an earlier
    release with events still waiting is kept until they are served, then remade."""
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=stream_name("sample"), retention=RetentionPolicy.LIMITS,
                                     subjects=[ep.EVENTS.subject_for(service="sample")]))
    inbox = nc.new_inbox()
    replies: list[Msg] = []
    await nc.subscribe(f"{inbox}.>", cb=functools.partial(_append, replies))
    for i in range(2):
        await js.publish(ep.EVENTS.subject_for(service="sample"), v2_body([row(i)]),
                         headers={REPLY_TO_HEADER: f"{inbox}.{i}"})
    async with running_stack(nats_url, redis_url, tmp_path):
        await deploy(nats_url, sample_spec())
        await wait_until(lambda: _count(replies), lambda n: n == 2, timeout=COLD_S,
                         what="the waiting events served")

        async def info_or_none() -> StreamInfo | None:
            try:  # between its deletion and its remaking, the stream is not there
                return await js.stream_info(stream_name("sample"))
            except NotFoundError:
                return None

        info = await wait_until(
            info_or_none,
            lambda i: i is not None and i.config.retention == RetentionPolicy.WORK_QUEUE,
            timeout=10, what="the stream remade as a work queue",
        )
        await consumer_ready(js, "sample")
    assert sorted(status(r) for r in replies) == ["200", "200"]
    assert info is not None
    assert info.state.messages == 0 and info.config.discard == DiscardPolicy.NEW
