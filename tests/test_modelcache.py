"""The node's model cache (issue 15): the storage URI policy, the cache keys and the LRU
choice as plain functions; the on-disk cache against a real local HTTP server (aiohttp, on
this loop) and real files: one download for many starts, a cut-short download never served,
eviction that spares models in use, and an index that survives the agent."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from partitions.modelcache.keys import cache_key
from partitions.modelcache.lru import Entry, evictions
from partitions.modelcache.policy import ModelUriError, UriPolicy, is_local_host, policy_from
from partitions.modelcache.store import ModelCache, ModelFetchError

# ---- the policy -------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    root, state = tmp_path / "models", tmp_path / "state"
    (root / "m").mkdir(parents=True)
    (root / "m" / "w.bin").write_bytes(b"x")
    state.mkdir()
    (state / "credentials.json").write_text("{}")
    (tmp_path / "outside.bin").write_bytes(b"secret")
    os.symlink(tmp_path / "outside.bin", root / "link-out")
    os.symlink(state, root / "state-link")
    return root, state


@pytest.mark.parametrize(("uri", "why"), [
    ("file://{tmp}/outside.bin", "outside the model root"),
    ("file://{tmp}/state/credentials.json", "inside fnplane's state dir"),
    ("file://{tmp}/models/state-link/credentials.json", "inside fnplane's state dir"),
    ("file://{tmp}/models/link-out", "outside the model root .*through a symlink"),
    ("file://{tmp}/models/m/../../outside.bin", r"'\.\.' is not allowed"),
    ("file://other-host/models/m", "not on host 'other-host'"),
    ("http://example.com/w.bin", "host 'example.com' is not on --model-hosts"),
    ("http://127.0.0.1:9/w.bin", "not on --model-hosts .*loopback"),
    ("http://169.254.169.254/latest/meta-data", "not on --model-hosts .*link-local"),
    ("http://localhost/w.bin", "not on --model-hosts .*loopback"),
    ("ftp://models.example/w.bin", "scheme 'ftp' is not supported"),
    ("http://[::1/w.bin", "malformed"),
    ("https://models.example/", "names no file"),
])
def test_the_policy_refuses_each_way_out_with_a_clear_error(
        roots: tuple[Path, Path], tmp_path: Path, uri: str, why: str) -> None:
    root, state = roots
    policy = UriPolicy(model_root=root, state_dir=state, hosts=frozenset({"models.example"}))
    with pytest.raises(ModelUriError, match=why):
        policy.check(uri.format(tmp=tmp_path))
    if "loopback" in why or "link-local" in why:  # not even with '*' on the list
        with pytest.raises(ModelUriError, match=why):
            UriPolicy(hosts=frozenset({"*"})).check(uri)


def test_the_policy_admits_the_model_root_and_listed_hosts(roots: tuple[Path, Path]) -> None:
    root, state = roots
    policy = UriPolicy(model_root=root, state_dir=state,
                       hosts=frozenset({"models.example", "127.0.0.1:8000"}))
    assert policy.check(f"file://{root}/m").path == str((root / "m").resolve())
    assert policy.check("https://models.example/a/w.bin").host == "models.example"
    assert policy.check("http://127.0.0.1:8000/w.bin").port == 8000  # loopback, listed
    with pytest.raises(ModelUriError, match="not on --model-hosts"):
        policy.check("http://127.0.0.1:8001/w.bin")  # another port: not listed
    with pytest.raises(ModelUriError, match="without a model root"):
        UriPolicy().check(f"file://{root}/m")


def test_a_listed_wildcard_never_reaches_loopback_through_dns() -> None:
    policy = UriPolicy(hosts=frozenset({"*"}))
    policy.check_address("u", "models.example", None, "10.0.0.7")
    with pytest.raises(ModelUriError, match=r"resolves to 127\.0\.0\.1"):
        policy.check_address("u", "evil.example", None, "127.0.0.1")
    listed = UriPolicy(hosts=frozenset({"cache.local"}))
    listed.check_address("u", "cache.local", None, "127.0.0.1")
    assert is_local_host("fe80::1") and is_local_host("0.0.0.0") and not is_local_host("8.8.8.8")


def test_a_model_root_inside_the_state_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelUriError, match="inside the state dir"):
        policy_from(model_root=tmp_path / "st" / "m", state_dir=tmp_path / "st", hosts=(),
                    max_bytes=1, timeout_s=1)


# ---- keys and the LRU choice ------------------------------------------------------------------


def test_cache_keys_follow_the_version_and_the_checksum() -> None:
    base = cache_key("http://h/w", size=10, etag="a")
    assert base == cache_key("http://h/w", size=10, etag="a")
    assert base != cache_key("http://h/w", size=10, etag="b")  # replaced at the same URI
    assert base != cache_key("http://h/w", size=11, etag="a")
    assert base != cache_key("http://h/v", size=10, etag="a")
    assert cache_key("u", sha256="ab" * 32, size=1) == cache_key("u", sha256="ab" * 32, size=2)


E = [Entry("a", "ua", 40, 1.0), Entry("b", "ub", 30, 2.0), Entry("c", "uc", 20, 3.0)]


@pytest.mark.parametrize(("in_use", "need", "reserved", "want"), [
    (set(), 10, 0, []),                      # fits beside them all
    (set(), 30, 0, ["a"]),                   # the least recently used goes first
    ({"a"}, 30, 0, ["b"]),                   # but never one in use
    ({"a"}, 60, 0, ["b", "c"]),
    ({"a", "c"}, 70, 0, None),               # cannot fit without evicting a used one
    (set(), 101, 0, None),                   # bigger than the cache
    (set(), 10, 20, ["a"]),                  # downloads under way count
])
def test_eviction_is_lru_and_spares_models_in_use(
        in_use: set[str], need: int, reserved: int, want: list[str] | None) -> None:
    assert evictions(E, in_use=in_use, need=need, capacity=100, reserved=reserved) == want


# ---- the cache on disk, against a real HTTP server ----------------------------------------------


class ModelServer:
    """A local HTTP server of model files: counts GETs, can throttle, can cut a body short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.gets: dict[str, int] = {}
        self.cut_short: set[str] = set()
        self.delay_s = 0.0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = self.files.get(name)
        if body is None:
            raise web.HTTPNotFound()
        headers = {"Content-Length": str(len(body)), "ETag": f'"{hash(body)}"'}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        self.gets[name] = self.gets.get(name, 0) + 1
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        await asyncio.sleep(self.delay_s)
        if name in self.cut_short:
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-body
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp


@pytest.fixture
async def models() -> AsyncIterator[ModelServer]:
    server = ModelServer()
    app = web.Application()
    app.router.add_route("*", "/{name}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


def make_cache(root: Path, server: ModelServer, capacity: int = 10_000,
               clock: Callable[[], float] | None = None) -> ModelCache:
    host = server.url.removeprefix("http://")
    policy = UriPolicy(hosts=frozenset({host}), max_bytes=5_000, timeout_s=10)
    return ModelCache(root, capacity_bytes=capacity, policy=policy,
                      **({"clock": clock} if clock else {}))


async def test_ten_concurrent_fetches_download_once(tmp_path: Path, models: ModelServer) -> None:
    models.files["w.npz"] = os.urandom(3000)
    models.delay_s = 0.2  # all ten ask while the one download is under way
    cache = make_cache(tmp_path / "cache", models)
    cache.load()
    got = await asyncio.gather(*(cache.fetch(f"{models.url}/w.npz") for _ in range(10)))

    assert models.gets == {"w.npz": 1} and cache.fetches == 1
    assert {g.path for g in got} == {tmp_path / "cache" / got[0].key}
    assert (got[0].path / "w.npz").read_bytes() == models.files["w.npz"]
    assert not os.access(got[0].path / "w.npz", os.W_OK) or os.geteuid() == 0
    assert oct((got[0].path / "w.npz").stat().st_mode & 0o777) == "0o444"
    again = await cache.fetch(f"{models.url}/w.npz")
    assert again.hit and models.gets == {"w.npz": 1}


async def test_a_download_cut_short_is_never_served(tmp_path: Path, models: ModelServer) -> None:
    models.files["w.npz"] = os.urandom(4000)
    models.cut_short.add("w.npz")
    cache = make_cache(tmp_path / "cache", models)
    cache.load()
    with pytest.raises(ModelFetchError, match=r"w\.npz"):
        await cache.fetch(f"{models.url}/w.npz")
    assert cache.entries == {} and cache.contents() == {}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["index.json"]  # no .tmp-*

    models.cut_short.clear()  # the next try fetches it whole
    ok = await cache.fetch(f"{models.url}/w.npz")
    assert (ok.path / "w.npz").read_bytes() == models.files["w.npz"]


async def test_a_wrong_checksum_is_never_served(tmp_path: Path, models: ModelServer) -> None:
    models.files["w.npz"] = b"weights"
    cache = make_cache(tmp_path / "cache", models)
    cache.load()
    with pytest.raises(ModelFetchError, match="sha256"):
        await cache.fetch(f"{models.url}/w.npz", sha256="0" * 64)
    assert cache.entries == {}


async def test_eviction_never_removes_a_model_a_running_pod_uses(
        tmp_path: Path, models: ModelServer) -> None:
    for name in "abcd":
        models.files[name] = name.encode() * 1000
    now = [0.0]
    cache = make_cache(tmp_path / "cache", models, capacity=2500, clock=lambda: now[0])
    cache.load()
    a = await cache.fetch(f"{models.url}/a")
    cache.acquire("pod-a", a.key)  # a pod runs on model a
    now[0] = 1
    await cache.fetch(f"{models.url}/b")  # b: cached, no pod
    now[0] = 2
    c = await cache.fetch(f"{models.url}/c")  # room only by evicting: b, not the older a

    assert set(cache.contents()) == {f"{models.url}/a", f"{models.url}/c"}
    assert (a.path / "a").exists()
    cache.acquire("pod-c", c.key)
    with pytest.raises(ModelFetchError, match=r"do not fit .* held by running pods"):
        await cache.fetch(f"{models.url}/d")  # a and c both in use
    assert (a.path / "a").exists() and (c.path / "c").exists()
    cache.release("pod-a")
    await cache.fetch(f"{models.url}/d")  # a's pod ended: a may go now
    assert set(cache.contents()) == {f"{models.url}/c", f"{models.url}/d"}


async def test_the_cache_survives_an_agent_restart(tmp_path: Path, models: ModelServer) -> None:
    models.files["w.npz"] = os.urandom(2000)
    first = make_cache(tmp_path / "cache", models)
    first.load()
    got = await first.fetch(f"{models.url}/w.npz")
    # The agent died mid-way through another download: its temporary directory remains.
    (tmp_path / "cache" / ".tmp-deadbeef-0").mkdir()
    (tmp_path / "cache" / ".tmp-deadbeef-0" / "half").write_bytes(b"x")

    second = make_cache(tmp_path / "cache", models)  # the restarted agent
    second.load()
    assert second.contents() == {f"{models.url}/w.npz": 2000}
    again = await second.fetch(f"{models.url}/w.npz")
    assert again.hit and again.path == got.path and models.gets == {"w.npz": 1}
    assert not (tmp_path / "cache" / ".tmp-deadbeef-0").exists()


async def test_a_file_uri_directory_is_copied_whole(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "m" / "sub").mkdir(parents=True)
    (root / "m" / "weights.npz").write_bytes(b"w" * 100)
    (root / "m" / "sub" / "vocab.txt").write_bytes(b"v" * 10)
    cache = ModelCache(tmp_path / "cache", capacity_bytes=1000,
                       policy=UriPolicy(model_root=root, state_dir=tmp_path / "state"))
    cache.load()
    got = await cache.fetch(f"file://{root}/m")
    assert got.size == 110
    assert (got.path / "sub" / "vocab.txt").read_bytes() == b"v" * 10
    with pytest.raises(ModelFetchError, match="not found"):
        await cache.fetch(f"file://{root}/missing")
