"""Persisted state carries a schema version. A state dir written by the first release (the
fixture was made by `fnplane up` of commit 2ebacf5, then `fnplane deploy sample` and
`fnplane deploy tiny --max-scale 3 --cpu 250m --env A=B` and one request) still loads,
serves and gets stamped; state of a newer schema is refused whole with what to do."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.js.api import RetentionPolicy

from controlplane.stack import Stack
from controlplane.statedir import STAMP, check_state_dir
from kernel import endpoints as ep
from kernel.config import NatsIngressConfig
from kernel.identity import login
from kernel.messages import Empty, ServiceList
from kernel.store import SCHEMA_KEY, STATE_SCHEMA, StateSchemaError, Store, schema_verdict
from tests.stackutil import admin, stack_config

FIXTURE = Path(__file__).parent / "fixtures" / "state-dir-0.1.0.tar.gz"


def unpack_first_release(into: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(into, filter="data")
    return into


async def test_a_state_dir_of_the_first_release_loads_serves_and_is_stamped(
    tmp_path: Path,
) -> None:
    state = unpack_first_release(tmp_path / "state")
    stack = Stack(stack_config(state), nats_port=None)
    await stack.start()
    try:
        assert stack.nats_url is not None and stack.redis_url is not None
        creds = stack.config.credentials
        async with admin(stack.nats_url, login(creds, "admin")) as bus:
            listed: ServiceList = await bus.call(ep.ADMIN_LIST, Empty(), timeout=5)
        specs = {s.spec.name: s.spec for s in listed.services}
        port = stack.activator.port  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http:
            body = json.loads((Path(__file__).parent.parent / "examples" / "sample"
                               / "request_v2.json").read_text())
            async with http.post(f"http://127.0.0.1:{port}/v2/models/sample/infer",
                                 json=body, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                status, answer = resp.status, await resp.json()
        activator = login(creds, "activator")  # the one kind with JetStream's API
        assert activator is not None
        nc = await nats.connect(stack.nats_url, **activator.nats_options())
        try:
            info = await nc.jetstream().stream_info("FNPLANE_EV_sample")
        finally:
            await nc.close()
        store = Store.from_url(stack.redis_url)
        try:
            stamped = await store.r.get(SCHEMA_KEY)
        finally:
            await store.close()
    finally:
        await stack.stop()

    assert set(specs) == {"sample", "tiny"}
    tiny = specs["tiny"]
    assert (tiny.scaling.max_scale, tiny.resources.cpu, tiny.env) == (3, 0.25, {"A": "B"})
    assert status == 200 and answer["model_name"] == "sample", answer
    # The first release's stream (limits retention, nothing waiting in it) is remade as a
    # work queue: JetStream cannot change a stream's retention in place.
    assert info.state.messages == 0 and info.config.retention == RetentionPolicy.WORK_QUEUE
    assert info.config.max_bytes == NatsIngressConfig().stream_max_bytes
    assert stamped == str(STATE_SCHEMA).encode()
    assert json.loads((state / STAMP).read_text()) == {"schema": STATE_SCHEMA}


async def test_a_state_dir_of_a_newer_schema_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    state = unpack_first_release(tmp_path / "state")
    (state / STAMP).write_text(json.dumps({"schema": STATE_SCHEMA + 1}))
    aof_before = (state / "redis" / "appendonly.aof").read_bytes()
    stack = Stack(stack_config(state), nats_port=None)

    with pytest.raises(StateSchemaError, match="newer than this release reads"):
        await stack.start()

    assert stack.nats is None and stack.redis is None  # no server was started on it
    assert (state / "redis" / "appendonly.aof").read_bytes() == aof_before


def test_an_unreadable_stamp_is_refused_not_guessed(tmp_path: Path) -> None:
    (tmp_path / STAMP).write_text("{not json")

    with pytest.raises(StateSchemaError, match="unreadable"):
        check_state_dir(tmp_path)


async def test_redis_of_a_newer_schema_is_refused(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    try:
        await store.r.set(SCHEMA_KEY, str(STATE_SCHEMA + 1))
        with pytest.raises(StateSchemaError, match="Redis holds fnplane state of schema"):
            await store.check_schema()
        await store.r.delete(SCHEMA_KEY)
        assert await store.check_schema() == STATE_SCHEMA  # none: stamped as ours
        assert await store.r.get(SCHEMA_KEY) == str(STATE_SCHEMA).encode()
    finally:
        await store.r.delete(SCHEMA_KEY)
        await store.close()


@pytest.mark.parametrize(
    ("found", "ok"),
    [(None, True), (1, True), (STATE_SCHEMA, True), (STATE_SCHEMA + 1, False), (0, False)],
)
def test_schema_verdict(found: int | None, ok: bool) -> None:
    if ok:
        assert schema_verdict(found, where="x") == (found or STATE_SCHEMA)
    else:
        with pytest.raises(StateSchemaError):
            schema_verdict(found, where="x")
