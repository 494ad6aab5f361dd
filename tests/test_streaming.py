"""Streaming end to end, the OpenAI-compatible routes and the per-service timeouts (issue 19,
items 1-3), against the whole embedded stack and the token pod (examples/tokens/): a cold
service streams its first event before the pod has finished; the `openai` client gets a
streamed chat completion from zero; a client that leaves frees its pod slot and cuts the pod's
generation; each Knative timeout answers 504 (or cuts the stream) and is counted."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from activator.handler import Answer
from activator.nats_stream import CHUNK, END, HEAD, SEQ_HEADER, request_stream
from activator.openai import in_openai_shape
from kernel.bus import Bus
from kernel.messages import ScalingSpec, ServiceSpec
from kernel.revisions import revision_name
from tests.stackutil import deploy, running_stack, sample_spec, wait_until

TOKENS = [sys.executable, "-m", "examples.tokens.server"]
REVISION = revision_name("tokens", 1)  # whose pods, throttler and direct slots serve it


def tokens_spec(name: str = "tokens", **overrides: object) -> ServiceSpec:
    overrides.setdefault("scaling", ScalingSpec(min_scale=0, stable_window_s=6.0,
                                                scale_to_zero_grace_s=30.0))
    return sample_spec(name, command=list(TOKENS), readiness_path="/v2/health/ready",
                       **overrides)


def sse_events(raw: bytes) -> list[str]:
    return [e[len("data: "):] for e in raw.decode().split("\n\n") if e.startswith("data: ")]


async def test_openai_client_streams_a_chat_completion_from_zero_first_token_before_the_end(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, tokens_spec(env={"TOKEN_DELAY_MS": "30"}))
        client = openai.AsyncOpenAI(base_url=f"{stack.url}/openai/v1", api_key="unused",
                                    max_retries=0, timeout=60)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tokens"], "listed without waking it"
        first_at: float | None = None
        text, sent_at = [], []
        stream = await client.chat.completions.create(
            model="tokens", messages=[{"role": "user", "content": "hi"}], stream=True,
            max_tokens=20)
        async for chunk in stream:
            if first_at is None:
                first_at = time.time()
            text.append(chunk.choices[0].delta.content or "")
            sent_at.append(chunk.model_extra["sent_at"])
        assert "".join(text) == "".join(f"tok{i} " for i in range(20))
        # The pod wrote its last event ~0.6 s after its first; the client had the first
        # before that: it was not held back until the answer was whole.
        assert first_at is not None and first_at < sent_at[-1], (first_at, sent_at[-1])
        metrics = await _metrics(stack.url)
        assert 'fnplane_serving_first_byte_duration_seconds_count{' in metrics
        assert 'stage="first_byte"' in metrics, "time to first byte is a cold-start stage"

        # Not streamed, completions and embeddings: forwarded unchanged, answered whole.
        done = await client.completions.create(model="tokens", prompt="x", max_tokens=3)
        assert done.choices[0].text == "tok0 tok1 tok2 "
        emb = await client.embeddings.create(model="tokens", input=["a", "b"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8

        # Errors in OpenAI's shape, which the client raises as its own types.
        with pytest.raises(openai.NotFoundError) as nf:
            await client.chat.completions.create(model="nope", messages=[])
        assert nf.value.code == "model_not_found" and "nope" in nf.value.message
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/openai/v1/chat/completions", json={}) as r:
                assert r.status == 400
                err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error" and "model" in err["message"]
        await client.close()


async def test_client_that_leaves_mid_stream_frees_its_slot_and_cuts_the_pod(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, tokens_spec(container_concurrency=1))
        body = {"model": "tokens", "messages": [], "stream": True, "max_tokens": 500,
                "token_delay_ms": 50}
        url = f"{stack.url}/openai/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                await r.content.readuntil(b"\n\n")
                throttler = stack.activator.services[REVISION].throttler
                assert throttler.in_flight == 1, "the stream holds its pod slot"
                pod_url = next(iter(throttler.pods.values())).url
                r.connection.transport.close()  # the client leaves, 25 s of tokens to go
            await wait_until(lambda: _value(throttler.in_flight), lambda n: n == 0,
                             timeout=5, what="the slot given back")
            stats = await wait_until(lambda: _get(http, pod_url + "/stats"),
                                     lambda s: s["cut"] == 1, timeout=5,
                                     what="the pod's generation cut")
            assert stats["active"] == 0
            # The one slot (container concurrency 1) serves the next request at once.
            short = {**body, "max_tokens": 3, "token_delay_ms": 1}
            async with http.post(url, json=short) as r:
                events = sse_events(await r.read())
            assert events[-1] == "[DONE]" and len(events) == 3 + 3


async def test_nats_request_reply_streams_as_messages_with_an_end_marker(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, tokens_spec())
        body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                       "data": ["go"]}],
                           "parameters": {"stream": True, "max_tokens": 5}}).encode()
        bus = await Bus.connect(nats_url, "test-stream-client")
        try:
            frames = [f async for f in request_stream(bus.nc, "svc.invoke.tokens", body,
                                                      timeout=30)]
            kinds = [f.kind for f in frames]
            assert kinds == [HEAD] + [CHUNK] * (len(frames) - 2) + [END], kinds
            assert frames[0].headers["Fnplane-Status"] == "200"
            assert frames[0].headers["Content-Type"] == "text/event-stream"
            seqs = [int(f.headers[SEQ_HEADER]) for f in frames[1:-1]]
            assert seqs == list(range(1, len(seqs) + 1))
            data = b"".join(f.data for f in frames[1:-1])
            tokens = [json.loads(e)["outputs"][0]["data"][0] for e in sse_events(data)]
            assert tokens == [f"tok{i} " for i in range(5)]
            # A requester that did not ask for a stream gets one message, as always.
            whole = await bus.nc.request("svc.invoke.tokens", body, timeout=30)
            assert len(sse_events(whole.data)) == 5
            assert stack.activator.services[REVISION].throttler.in_flight == 0
        finally:
            await bus.close()


@pytest.mark.parametrize(
    ("spec", "request_", "which", "cut_mid_stream"),
    [
        ({"response_start_timeout_s": 0.5}, {"first_delay_ms": 3000},
         "responseStartTimeoutSeconds", False),
        ({"idle_timeout_s": 0.5}, {"token_delay_ms": 2000}, "idleTimeoutSeconds", True),
        ({"timeout_s": 1.0}, {"token_delay_ms": 100, "max_tokens": 100}, "timeoutSeconds",
         True),
    ],
)
async def test_each_timeout_fires_with_its_error_and_is_counted(
    nats_url: str, redis_url: str, tmp_path: Path, spec: dict, request_: dict, which: str,
    cut_mid_stream: bool,
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, tokens_spec(**spec))
        body = {"model": "tokens", "messages": [], "stream": True, **request_}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/openai/v1/chat/completions", json=body) as r:
                if cut_mid_stream:  # headers sent: the stream ends early, saying why
                    assert r.status == 200
                    raw = b""
                    with pytest.raises(aiohttp.ClientPayloadError):
                        async for chunk in r.content.iter_any():
                            raw += chunk
                    err = json.loads(sse_events(raw)[-1])["error"]
                else:
                    assert r.status == 504
                    err = (await r.json())["error"]
                assert err["type"] == "timeout" and which in err["message"], err
            # The KServe routes answer in KServe's shape.
            if not cut_mid_stream:
                async with http.post(f"{stack.url}/v2/models/tokens/infer", json={
                        "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                    "data": ["a"]}], "parameters": request_}) as r:
                    assert r.status == 504
                    assert which in (await r.json())["error"]
        metrics = await _metrics(stack.url)
        assert f'timeout="{which}"' in metrics, "the expiry is counted"


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        return await r.text()


async def _get(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as r:
        return await r.json()


async def _value(v: int) -> int:
    await asyncio.sleep(0)
    return v


async def test_direct_mode_streams_too_and_holds_the_pods_slot_until_the_end(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    scaling = ScalingSpec(min_scale=0, stable_window_s=6, scale_to_zero_grace_s=30,
                          target_burst_capacity=0)
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, tokens_spec(container_concurrency=4, scaling=scaling))
        gw = stack.activator
        url = f"{stack.url}/openai/v1/chat/completions"
        body = {"model": "tokens", "messages": [], "stream": True, "max_tokens": 10,
                "token_delay_ms": 50}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json={**body, "token_delay_ms": 1}) as r:
                assert r.headers["X-Fnplane-Path"] == "activator", "the cold one is buffered"
                await r.read()
            await wait_until(lambda: _value(gw.services[REVISION].mode),
                             lambda m: m == "direct", timeout=10, what="direct mode")
            async with http.post(url, json=body) as r:
                assert r.headers["X-Fnplane-Path"] == "direct"
                first = await r.content.readuntil(b"\n\n")
                first_at = time.time()
                assert gw.direct.total(REVISION) == 1, "the stream holds its direct slot"
                rest = await r.read()
            events = sse_events(first + rest)
            assert events[-1] == "[DONE]"
            assert first_at < json.loads(events[-2])["sent_at"], "first event before the end"
            assert gw.direct.total(REVISION) == 0


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # The gateway's own errors (KServe's shape) said OpenAI's way.
        (404, b'{"error": "Model with name x does not exist."}',
         {"message": "Model with name x does not exist.", "type": "invalid_request_error",
          "param": None, "code": "model_not_found"}),
        (504, b'{"error": "model x did not answer"}',
         {"message": "model x did not answer", "type": "timeout", "param": None,
          "code": "timeout"}),
        (503, b'{"error": "buffer full"}',
         {"message": "buffer full", "type": "server_error", "param": None, "code": None}),
        # vLLM's flat ErrorResponse, and a body that is not JSON.
        (400, b'{"object": "error", "message": "bad n", "type": "BadRequestError"}',
         {"message": "bad n", "type": "invalid_request_error", "param": None, "code": None}),
        (500, b"boom", {"message": "boom", "type": "server_error", "param": None,
                        "code": None}),
        # A pod's own OpenAI error passes unchanged.
        (429, b'{"error": {"message": "slow down", "type": "rate_limit_error"}}',
         {"message": "slow down", "type": "rate_limit_error"}),
    ],
)
def test_errors_on_the_openai_routes_take_openais_shape(status: int, body: bytes,
                                                         expected: dict) -> None:
    shaped = in_openai_shape(Answer(status, body, pod="p-1"))
    assert shaped.status == status and shaped.pod == "p-1"
    assert json.loads(shaped.body) == {"error": expected}
