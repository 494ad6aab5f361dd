"""Identity on the bus, against a real nats-server configured as `fnplane up` configures it:
one user per component kind, whose permissions come from the endpoint declarations. A
client without credentials (a pod) cannot connect; every kind may send exactly what it is
declared to call, and the forged messages of the hostile-tester report are refused by the
server and never reach their subscriber."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
import redis.asyncio as redis
from nats.aio.client import Client

from controlplane.servers import NatsServer, start_nats, start_redis
from kernel import endpoints as ep
from kernel.identity import CREDENTIALS_FILE, KINDS, Credentials, Login
from kernel.messages import (
    PartitionMap,
    PodEvent,
    Resources,
    ServiceSpec,
    StartPod,
    encode,
)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, Credentials]]:
    creds, _path = Credentials.ensure(tmp_path)
    server = await start_nats(tmp_path, authorization=creds.server_authorization())
    try:
        yield server, creds
    finally:
        await server.stop()


class Session:
    """One connection as one kind, collecting the server's permission errors."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    @classmethod
    async def open(cls, url: str, creds: Credentials, kind: str) -> Session:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False,
                                **Login(kind, creds.passwords[kind]).nats_options())
        return cls(nc, errors)

    async def settle(self) -> None:
        await self.nc.flush()
        await asyncio.sleep(0.2)  # the server's -ERR arrives after its PONG


def concrete(endpoint: ep.Endpoint[object, object], kind: str) -> str:
    return endpoint.subject_for(**{p: (kind if p == "kind" else "x1") for p in endpoint.params})


def test_credentials_and_server_config_are_private_to_their_owner(tmp_path: Path) -> None:
    Credentials.ensure(tmp_path)

    mode = stat.S_IMODE(os.stat(tmp_path / CREDENTIALS_FILE).st_mode)
    assert mode == 0o600
    assert Credentials.ensure(tmp_path)[0] == Credentials.load(tmp_path / CREDENTIALS_FILE)


async def test_no_credentials_no_connection(
    secured: tuple[NatsServer, Credentials]
) -> None:
    server, _creds = secured

    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=1,
                           connect_timeout=2)


@pytest.mark.parametrize("kind", KINDS)
async def test_each_kind_may_send_exactly_what_it_is_declared_to_call(
    kind: str, secured: tuple[NatsServer, Credentials]
) -> None:
    server, creds = secured
    session = await Session.open(server.url, creds, kind)
    try:
        for endpoint in ep.ALL:
            await session.nc.publish(concrete(endpoint, kind), b"\x80")
        await session.settle()
    finally:
        await session.nc.close()

    refused = {e.split('"')[1] for e in session.errors if "permissions violation" in e.lower()}
    allowed = {concrete(e, kind) for e in ep.ALL if kind in e.called_by}
    assert refused == {concrete(e, kind) for e in ep.ALL} - allowed


SPEC = ServiceSpec(name="evil", command=["sh", "-c", "id"], resources=Resources(cpu=0.1,
                                                                               memory_mb=16))
FORGED = [
    # (what, sender kind, endpoint, params, message, the kind that would receive it)
    ("StartPod that skips the epoch check", "activator", ep.NODE_START, {"node": "node-0"},
     StartPod(pod="x", spec=SPEC, node="node-0", requested_at=0, placed_at=0, partition=-1),
     "node"),
    ("a pod 'ready' at a foreign URL", "activator", ep.POD_EVENTS, {"service": "sample"},
     PodEvent(pod="x", service="sample", node="node-0", state="ready", url="http://evil"),
     "route"),
    ("a partition map from the future", "schedule", ep.PARTITION_MAP, {},
     PartitionMap(version=10**9, partitions=[]), "schedule"),
]


@pytest.mark.parametrize(("what", "sender", "endpoint", "params", "msg", "receiver"), FORGED,
                         ids=[f[0] for f in FORGED])
async def test_forged_messages_are_refused_and_change_nothing(
    secured: tuple[NatsServer, Credentials], what: str, sender: str,
    endpoint: ep.Endpoint[object, object], params: dict[str, str], msg: object, receiver: str,
) -> None:
    server, creds = secured
    forger = await Session.open(server.url, creds, sender)
    target = await Session.open(server.url, creds, receiver)
    got: list[bytes] = []

    async def on_msg(raw: nats.aio.msg.Msg) -> None:
        got.append(raw.data)

    try:
        await target.nc.subscribe(endpoint.subject_for(**params), cb=on_msg)
        await target.settle()
        await forger.nc.publish(endpoint.subject_for(**params), encode(msg))  # type: ignore[arg-type]
        await forger.settle()
    finally:
        await forger.nc.close()
        await target.nc.close()

    assert got == [], f"{what}: delivered"
    assert any("permissions violation" in e.lower() for e in forger.errors), forger.errors


async def test_only_admin_credentials_reach_the_admin_api(
    secured: tuple[NatsServer, Credentials]
) -> None:
    server, creds = secured
    for kind in KINDS:
        session = await Session.open(server.url, creds, kind)
        try:
            await session.nc.publish(ep.ADMIN_DEPLOY.subject, b"\x80")
            await session.settle()
        finally:
            await session.nc.close()
        refused = any("permissions violation" in e.lower() for e in session.errors)
        assert refused == (kind not in ("admin", "operator")), kind


async def test_redis_has_no_default_user_and_fnplane_may_not_reconfigure_it(
    tmp_path: Path,
) -> None:
    """As `fnplane up` runs it: an unauthenticated client is refused; fnplane's ACL user
    reads and writes but cannot run CONFIG (or FLUSHALL, KEYS …)."""
    creds, _path = Credentials.ensure(tmp_path)
    server = await start_redis(tmp_path, password=creds.redis)
    anonymous = redis.Redis(host=server.host, port=server.port)
    ours = redis.Redis.from_url(server.url)
    try:
        with pytest.raises(redis.AuthenticationError):
            await anonymous.get("fnplane:services")
        await ours.set("fnplane:probe", "1")
        assert await ours.get("fnplane:probe") == b"1"
        with pytest.raises(redis.ResponseError, match=r"permissions|NOPERM"):
            await ours.config_get("dir")
        with pytest.raises(redis.ResponseError, match=r"permissions|NOPERM"):
            await ours.flushall()
    finally:
        await anonymous.aclose()
        await ours.aclose()
        await server.stop()

    assert server.process.returncode is not None
