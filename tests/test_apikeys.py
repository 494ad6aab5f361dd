"""Front-door identity (issue 19): API keys and their rate limits.

The decisions first, pure and table-driven with time a parameter: the token bucket, and the
verdict on a presented key (no key, a malformed, unknown, revoked one → 401; another
service's → 403). Then the bucket's Lua transcription on the session's real Redis, held
equal to the Python one on the same sequence. Then the gateway with keys on: every ingress
(HTTP, gRPC, `svc.invoke`) refuses in KServe's error shape with the right status, a
revocation holds at once, and one key's limit holds within 10% over 10 s across two
gateways sharing its bucket."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis

from activator.nats_events import REPLY_TO_HEADER
from activator.oipgrpc import messages as m
from activator.server import Activator
from controlplane import build
from kernel import endpoints as ep
from kernel.apikeys import bearer, hash_secret, new_key, parse, verdict
from kernel.config import ApiKeysConfig
from kernel.messages import ApiKey, KeyCreate, KeyCreated, KeyRevoke, StoredKey
from kernel.store import Store
from kernel.tokenbucket import Bucket, retry_after_s, take
from tests.stackutil import admin, deploy, running_stack, sample_spec, wait_until
from tests.test_nats_ingress import consumer_ready

V2 = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                  "data": [[5.1, 3.5, 1.4, 0.2]]}]}

# ---- the token bucket, pure ------------------------------------------------------------------

# (seconds since the first request, wait expected: 0 = let in)
BUCKET_CASES: list[tuple[str, float, int, list[tuple[float, float]]]] = [
    ("a full bucket lets a burst through, then one per 1/rps", 2.0, 3,
     [(0.0, 0), (0.0, 0), (0.0, 0), (0.0, 0.5), (0.5, 0), (0.5, 0.5), (0.75, 0.25)]),
    ("a quiet spell refills only up to the burst", 10.0, 2,
     [(0.0, 0), (0.0, 0), (5.0, 0), (5.0, 0), (5.0, 0.1)]),
    ("refused requests take no token", 1.0, 1,
     [(0.0, 0), (0.2, 0.8), (0.4, 0.6), (1.0, 0)]),
    ("a clock behind the bucket's refills nothing", 1.0, 1,
     [(5.0, 0), (4.0, 1.0)]),
]


@pytest.mark.parametrize(("case", "rps", "burst", "steps"), BUCKET_CASES,
                         ids=[c[0] for c in BUCKET_CASES])
def test_token_bucket(case: str, rps: float, burst: int,
                      steps: list[tuple[float, float]]) -> None:
    bucket: Bucket | None = None
    for at, want in steps:
        bucket, wait = take(bucket, rps=rps, burst=burst, now=1000.0 + at)
        assert wait == pytest.approx(want), (case, at)


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after_s(w) for w in (0.01, 0.5, 1.0, 1.2, 3.0)] == [1, 1, 1, 2, 3]


async def test_the_lua_bucket_decides_as_the_python_one(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    try:
        for n, (_case, rps, burst, steps) in enumerate(BUCKET_CASES):
            key_id = f"test-bucket-{n}-{time.time_ns()}"
            bucket: Bucket | None = None
            for at, _want in steps:
                now = 1_700_000_000.0 + at
                bucket, wait = take(bucket, rps=rps, burst=burst, now=now)
                got = await store.take_token(key_id, rps=rps, burst=burst, now=now)
                assert got == pytest.approx(wait, abs=1e-6), (key_id, at)
    finally:
        await store.close()


# ---- the verdict, pure -------------------------------------------------------------------


def test_keys_are_kept_hashed_and_parsed_by_id() -> None:
    stored, whole = new_key("iris", rps=5, burst=0, now=1.0)
    key_id, secret = parse(whole) or ("", "")
    assert key_id == stored.key.id and stored.secret_sha256 == hash_secret(secret)
    assert secret not in stored.secret_sha256 and stored.key.burst == 5  # a second's worth
    assert parse("fnp_nothex_" + secret) is None and parse(whole + "x") is None
    assert bearer(f"Bearer {whole}") == whole and bearer(f"bearer  {whole} ") == whole
    assert bearer(f"Basic {whole}") is None and bearer(None) is None and bearer("Bearer") is None


def test_verdicts() -> None:
    stored, whole = new_key("iris", rps=0, burst=0, now=1.0)
    other, other_whole = new_key("iris", rps=0, burst=0, now=1.0)
    revoked = StoredKey(key=ApiKey(**{**_fields(stored.key), "revoked_at": 2.0}),
                        secret_sha256=stored.secret_sha256)
    wrong_secret = whole[:-1] + ("A" if whole[-1] != "A" else "B")
    cases = [
        (None, None, "iris", 401, "missing"),
        ("not-a-key", None, "iris", 401, "malformed"),
        (whole, None, "iris", 401, "unknown"),
        (wrong_secret, stored, "iris", 401, "unknown"),  # a guessed id tells nothing
        (other_whole, stored, "iris", 401, "unknown"),
        (whole, revoked, "iris", 401, "revoked"),
        (whole, stored, "wine", 403, "wrong_service"),
        (whole, stored, "iris", 0, "ok"),
    ]
    for token, record, service, status, reason in cases:
        v = verdict(token, record, service)
        assert (v.status, v.reason) == (status, reason), (token, reason)
        assert token is None or token not in v.message  # never the key in an answer
    assert other.key.id != stored.key.id


def _fields(key: ApiKey) -> dict[str, Any]:
    return {f: getattr(key, f) for f in key.__struct_fields__}


# ---- the gateway with keys on ------------------------------------------------------------


async def _key(nats_url: str, service: str, **limit: Any) -> KeyCreated:
    async with admin(nats_url) as bus:
        created = await bus.call(ep.ADMIN_KEY_CREATE, KeyCreate(service=service, **limit),
                                 timeout=5)
    assert isinstance(created, KeyCreated)
    return created


async def _post(http: aiohttp.ClientSession, url: str, service: str,
                key: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(f"{url}/v2/models/{service}/infer", json=V2, headers=headers) as r:
        return r.status, json.loads(await r.read()), dict(r.headers)


async def _grpc_infer(address: str, service: str, key: str | None) -> tuple[str, str]:
    req = m.ModelInferRequest(model_name=service)
    x = req.inputs.add(name="input-0", datatype="FP32", shape=[1, 4])
    x.contents.fp32_contents.extend([5.1, 3.5, 1.4, 0.2])
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{m.SERVICE}/ModelInfer",
                                   request_serializer=m.ModelInferRequest.SerializeToString,
                                   response_deserializer=m.ModelInferResponse.FromString)
        try:
            await call(req, metadata=(("authorization", f"Bearer {key}"),) if key else (),
                       timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
    return "OK", ""


async def _nats_infer(nats_url: str, service: str, key: str | None) -> tuple[str, dict[str, Any]]:
    async with admin(nats_url) as bus:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        msg = await bus.nc.request(f"svc.invoke.{service}", json.dumps(V2).encode(),
                                   timeout=60, headers=headers)
    return (msg.headers or {}).get("Fnplane-Status", ""), json.loads(msg.data)


async def _event_replies(nats_url: str, service: str,
                         keys: list[str | None]) -> list[tuple[str, dict[str, Any]]]:
    """One event per key on `svc.events.{service}`, each asking for its outcome; in order."""
    async with admin(nats_url) as bus:
        nc = bus.nc
        js = nc.jetstream()
        await consumer_ready(js, service)
        inbox, replies = nc.new_inbox(), {}

        async def on_reply(msg: Any) -> None:
            replies[msg.subject] = msg

        await nc.subscribe(f"{inbox}.>", cb=on_reply)
        for i, key in enumerate(keys):
            headers = {REPLY_TO_HEADER: f"{inbox}.{i}"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            await js.publish(ep.EVENTS.subject_for(service=service), json.dumps(V2).encode(),
                             headers=headers)
        async def answered() -> int:
            return len(replies)

        await wait_until(answered, lambda n: n == len(keys), timeout=30,
                         what="every event answered")
        got = [replies[f"{inbox}.{i}"] for i in range(len(keys))]
    return [((r.headers or {}).get("Fnplane-Status", ""), json.loads(r.data)) for r in got]


async def test_every_ingress_refuses_with_the_right_status_and_body(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path, grpc_port=0,
                             keys=ApiKeysConfig(enabled=True)) as stack:
        assert stack.activator is not None
        url, address = stack.url, stack.activator.grpc_address
        await deploy(nats_url, sample_spec(name="keyed"))
        await deploy(nats_url, sample_spec(name="keyed-other"))
        mine = (await _key(nats_url, "keyed")).secret
        theirs = (await _key(nats_url, "keyed-other")).secret
        tight = await _key(nats_url, "keyed", rps=0.2, burst=1)
        async with aiohttp.ClientSession() as http:
            ok = await _post(http, url, "keyed", mine)  # from zero, through the gate
            no_key = await _post(http, url, "keyed", None)
            unknown = await _post(http, url, "keyed", mine[:-2] + "zz")
            wrong = await _post(http, url, "keyed", theirs)
            first = await _post(http, url, "keyed", tight.secret)
            limited = await _post(http, url, "keyed", tight.secret)
            async with http.get(f"{url}/v2/health/ready") as r:
                health = r.status  # no model named: no key asked
            # OpenAI's routes name the model in the body: gated there, refused in its shape.
            chat = {"model": "keyed", "messages": [{"role": "user", "content": "hi"}]}
            openai_seen = []
            for k in (None, theirs):
                async with http.post(f"{url}/openai/v1/chat/completions", json=chat,
                                     headers={"Authorization": f"Bearer {k}"} if k else {}) as r:
                    openai_seen.append((r.status, await r.json()))
            listed = []
            for k in (mine, None):
                async with http.get(f"{url}/openai/v1/models",
                                    headers={"Authorization": f"Bearer {k}"} if k else {}) as r:
                    listed.append((r.status, await r.json()))
            grpc_seen = [await _grpc_infer(address, "keyed", k)
                         for k in (mine, None, theirs)]
            nats_seen = [await _nats_infer(nats_url, "keyed", k) for k in (mine, None, theirs)]
            events_seen = await _event_replies(nats_url, "keyed", [mine, None, theirs])
            async with admin(nats_url) as bus:
                await bus.call(ep.ADMIN_KEY_REVOKE, KeyRevoke(id=theirs.split("_")[1]),
                               timeout=5)
            await asyncio.sleep(0.2)  # the revocation crosses NATS to the gateway
            revoked = await _post(http, url, "keyed-other", theirs)

    assert ok[0] == 200 and ok[1]["model_name"] == "keyed"
    assert no_key[0] == 401 and "API key is required" in no_key[1]["error"]
    assert no_key[2]["WWW-Authenticate"].startswith("Bearer")
    assert unknown[:2] == (401, {"error": "invalid API key"})
    key_id = theirs.split("_")[1]
    assert wrong[:2] == (403, {"error": f"API key {key_id} is not for model keyed"})
    assert first[0] == 200
    assert limited[0] == 429 and limited[1] == {
        "error": f"API key {tight.key.id} is over its rate limit of 0.2 requests/s"}
    assert 1 <= int(limited[2]["Retry-After"]) <= 5
    assert health == 200
    assert openai_seen[0][0] == 401
    assert openai_seen[0][1]["error"]["type"] == "authentication_error"
    assert openai_seen[1][0] == 403
    assert openai_seen[1][1]["error"]["message"] == f"API key {key_id} is not for model keyed"
    assert listed[0][0] == 200 and [m["id"] for m in listed[0][1]["data"]] == ["keyed"]
    assert listed[1][0] == 401
    assert grpc_seen[0] == ("OK", "")
    assert grpc_seen[1][0] == "UNAUTHENTICATED" and "API key is required" in grpc_seen[1][1]
    assert grpc_seen[2] == ("PERMISSION_DENIED", f"API key {key_id} is not for model keyed")
    assert nats_seen[0][0] == "200"
    assert nats_seen[1][0] == "401" and "API key is required" in nats_seen[1][1]["error"]
    assert nats_seen[2] == ("403", {"error": f"API key {key_id} is not for model keyed"})
    assert [e[0] for e in events_seen] == ["200", "401", "403"]  # refused: not redelivered
    assert events_seen[2][1] == {"error": f"API key {key_id} is not for model keyed"}
    assert revoked[:2] == (401, {"error": f"API key {key_id} was revoked"})


async def test_a_rate_limit_holds_within_ten_percent_across_two_gateways(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Callers ask ~3x the key's rate for 10 s, alternating between two gateways that share
    the key's bucket in Redis: what they let through is the burst plus rate x time, ±10%."""
    rps, burst, seconds = 10.0, 5, 10.0
    async with running_stack(nats_url, redis_url, tmp_path,
                             keys=ApiKeysConfig(enabled=True)) as stack:
        second: Activator = await build.activator(stack.config)
        await second.start()
        try:
            await deploy(nats_url, sample_spec(name="limited"))
            warm = (await _key(nats_url, "limited")).secret
            limited = (await _key(nats_url, "limited", rps=rps, burst=burst)).secret
            statuses: list[int] = []
            async with aiohttp.ClientSession() as http:
                assert (await _post(http, stack.url, "limited", warm))[0] == 200  # a pod up

                async def caller(n: int, until: float) -> None:
                    urls = (stack.url, second.url)
                    while time.monotonic() < until:
                        status, _, _ = await _post(http, urls[n % 2], "limited", limited)
                        statuses.append(status)
                        n += 1
                        await asyncio.sleep(0.1)

                t0 = time.monotonic()
                await asyncio.gather(*(caller(n, t0 + seconds) for n in range(3)))
                elapsed = time.monotonic() - t0
        finally:
            await second.stop()

    assert set(statuses) <= {200, 429}, statuses
    allowed = statuses.count(200)
    expected = burst + rps * elapsed
    assert statuses.count(429) > 0
    assert abs(allowed - expected) <= 0.1 * expected, (allowed, expected, len(statuses))


async def test_keys_are_listed_without_secrets(nats_url: str, redis_url: str) -> None:
    store = Store.from_url(redis_url)
    try:
        stored, whole = new_key("listed", rps=1, burst=2, now=time.time())
        await store.put_key(stored)
        listed = [k for k in await store.list_keys() if k.id == stored.key.id]
        plain = aioredis.from_url(redis_url)
        raw = await plain.hget("fnplane:apikeys", stored.key.id)
        await plain.aclose()
    finally:
        await store.close()
    assert listed == [stored.key]
    assert raw is not None and whole.split("_", 2)[2].encode() not in raw
