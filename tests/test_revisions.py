"""Revisions and traffic splits end to end, on the embedded stack (real nats-server, Redis
and sample-model pods): a 90/10 split lands on its weights, a tag reaches only its
revision, rollback moves everything back without a failed request, a canary at zero is
woken by its own first request while the stable revision serves, and a revision whose pods
cannot start gets no traffic while the other answers every request."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from controlplane.cli import CliError, build_parser
from kernel import endpoints as ep
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import (
    DeployRequest,
    NameRequest,
    ScalingSpec,
    ServiceSpec,
    ServiceStatus,
    TrafficRequest,
    TrafficTarget,
)
from partitions.agents.local import LocalNode
from tests.stackutil import admin, deploy, describe, running_stack, sample_spec, wait_until

BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}
# Warm pods for the whole test (a 60 s grace), scaled from zero by their first request.
WARM = ScalingSpec(min_scale=0, stable_window_s=6.0, scale_to_zero_grace_s=60.0)


async def call(bus_url: str, msg: DeployRequest | TrafficRequest) -> ServiceStatus:
    endpoint = ep.ADMIN_DEPLOY if isinstance(msg, DeployRequest) else ep.ADMIN_TRAFFIC
    async with admin(bus_url) as bus:
        reply = await bus.call(endpoint, msg, timeout=5)
    assert isinstance(reply, ServiceStatus)
    return reply


async def refused(bus_url: str, msg: DeployRequest | TrafficRequest) -> ErrorCode:
    try:
        await call(bus_url, msg)
    except RemoteError as exc:
        return exc.code
    raise AssertionError(f"{msg} was accepted")


async def infer(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, str]:
    """(status, revision, pod); a lost request shows as status 0."""
    try:
        async with http.post(url, json=BODY, headers=headers) as r:
            await r.read()
            return r.status, r.headers.get("X-Fnplane-Revision", ""), r.headers.get(
                "X-Fnplane-Pod", "")
    except (aiohttp.ClientError, TimeoutError):
        return 0, "", ""


async def many(http: aiohttp.ClientSession, url: str, n: int, *, concurrency: int = 32,
               **headers: str) -> list[tuple[int, str, str]]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> tuple[int, str, str]:
        async with gate:
            return await infer(http, url, **headers)

    return list(await asyncio.gather(*(one() for _ in range(n))))


def v2(spec: ServiceSpec) -> ServiceSpec:
    """A new pod template (an env change): a new revision of the same service."""
    return ServiceSpec(**{**{f: getattr(spec, f) for f in spec.__struct_fields__},
                          "env": {**spec.env, "REVISION_MARK": str(time.time())}})


async def test_split_tags_and_rollback(nats_url: str, redis_url: str, tmp_path: Path) -> None:
    spec = sample_spec("split", scaling=WARM)
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        first = await deploy(nats_url, spec)
        assert first.spec.revisions == ["split-00001"]
        # a scaling-only change makes no revision
        again = await deploy(nats_url, sample_spec("split", scaling=ScalingSpec(
            min_scale=0, stable_window_s=6.0, scale_to_zero_grace_s=59.0)))
        assert again.spec.revisions == ["split-00001"]
        # bad input changes nothing: unknown revision, sum != 100, colliding tag
        assert await refused(nats_url, DeployRequest(spec=v2(spec), traffic=[
            TrafficTarget(revision="split-00009", percent=100)])) is ErrorCode.NOT_FOUND
        assert await refused(nats_url, DeployRequest(spec=v2(spec), traffic=[
            TrafficTarget(revision="@latest", percent=10),
            TrafficTarget(revision="split-00001", percent=80)])) is ErrorCode.INVALID
        assert (await describe(nats_url, "split")).spec.revisions == ["split-00001"]
        st = await call(nats_url, DeployRequest(
            spec=v2(spec), traffic=[TrafficTarget(revision="@latest", percent=10),
                                    TrafficTarget(revision="split-00001", percent=90)],
            tags={"split-00001": "stable", "@latest": "canary"}))
        assert st.spec.revisions == ["split-00001", "split-00002"]
        assert await refused(nats_url, TrafficRequest(
            name="split", tags={"split-00001": "canary"})) is ErrorCode.CONFLICT
        url = f"{stack.url}/v2/models/split/infer"
        async with aiohttp.ClientSession() as http:
            # a tag reaches only its revision (and wakes it)
            for tag, rev in [("canary", "split-00002"), ("stable", "split-00001")]:
                got = await many(http, url, 20, concurrency=4, **{"X-Fnplane-Tag": tag})
                assert {(s, r) for s, r, _ in got} == {(200, rev)}, got
                assert all(pod.startswith(rev + "-") for _, _, pod in got)
            # the OIP version is the revision number
            got = await many(http, f"{stack.url}/v2/models/split/versions/2/infer", 10)
            assert {(s, r) for s, r, _ in got} == {(200, "split-00002")}
            got = await many(http, url, 2000, concurrency=48)
            assert Counter(s for s, _, _ in got) == {200: 2000}
            share = Counter(r for _, r, _ in got)
            canary = share["split-00002"] / 2000
            print(f"90/10 split over 2000 requests: {dict(share)} ({canary:.1%} canary)")
            assert abs(canary - 0.10) <= 0.03, share
            # rollback under load: every request answered, then all on the first revision
            load = asyncio.create_task(many(http, url, 600, concurrency=8))
            await asyncio.sleep(0.3)
            back = await call(nats_url, TrafficRequest(name="split", rollback=True))
            assert [(t.revision, t.percent) for t in back.spec.traffic if t.percent] == [
                ("split-00001", 100)]
            during = await load
            assert Counter(s for s, _, _ in during) == {200: 600}
            after = await many(http, url, 100)
            assert {(s, r) for s, r, _ in after} == {(200, "split-00001")}
            # the canary's tag still reaches it after the rollback
            got = await many(http, url, 5, **{"X-Fnplane-Tag": "canary"})
            assert {r for _, r, _ in got} == {"split-00002"}
        st = await describe(nats_url, "split")
        assert {r.spec.name: (r.percent, r.tags) for r in st.revisions} == {
            "split-00001": (100, ["stable"]), "split-00002": (0, ["canary"])}
        assert st.latest_ready_revision == "split-00002"


async def test_a_canary_at_zero_wakes_on_its_first_request_while_stable_serves(
        nats_url: str, redis_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    spec = sample_spec("canary", scaling=WARM, env={})
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        url = f"{stack.url}/v2/models/canary/infer"
        async with aiohttp.ClientSession() as http:
            assert (await infer(http, url))[:2] == (200, "canary-00001")
            # the canary starts at zero: initial-scale 0, woken only by a request
            zero = ScalingSpec(min_scale=0, initial_scale=0, stable_window_s=6.0,
                               scale_to_zero_grace_s=60.0)
            await call(nats_url, DeployRequest(spec=v2(sample_spec(
                "canary", scaling=zero, env={"SAMPLE_STARTUP_DELAY_MS": "1500"})),
                canary_percent=50))
            await asyncio.sleep(0.5)
            st = await describe(nats_url, "canary")
            assert not [p for p in st.pods if p.service == "canary-00002"], st.pods
            cold = asyncio.create_task(infer(http, url, **{"X-Fnplane-Tag": "none"}))
            assert (await cold)[0] == 404  # an unknown tag is a 404, and wakes nothing
            # 40 at once: the canary's share waits for its cold start (1.5 s to ready)
            # while stable answers its share; the order of answers shows it.
            order: list[str] = []

            async def one() -> tuple[int, str, str]:
                got = await infer(http, url)
                order.append(got[1])
                return got

            got = await asyncio.gather(*(one() for _ in range(40)))
        assert Counter(s for s, _, _ in got) == {200: 40}
        share = Counter(r for _, r, _ in got)
        assert share["canary-00001"] and share["canary-00002"], share
        first_canary = order.index("canary-00002")
        assert "canary-00001" in order[:first_canary], order  # stable served meanwhile
        st = await describe(nats_url, "canary")
        assert [p for p in st.pods if p.service == "canary-00002" and p.state == "ready"]
        assert st.last_cold_start is not None and st.last_cold_start.service == "canary-00002"
        # the CLI, kn's way: traffic by number and @latest, tags, rollback, list, describe
        await cli(nats_url, "traffic", "canary", "--traffic", "1=20", "--traffic",
                  "@latest=80", "--tag", "canary-00002=next")
        out = await cli(nats_url, "describe", "canary", capsys=capsys)
        assert "canary-00002" in out and " 80%" in out and "tag next" in out, out
        out = await cli(nats_url, "rollback", "canary", capsys=capsys)
        assert "100%  canary-00001" in out, out
        out = await cli(nats_url, "list", capsys=capsys)
        assert "canary-00002" in out, out  # the latest ready revision
        with pytest.raises(CliError, match="sum to 90"):
            await cli(nats_url, "traffic", "canary", "--traffic", "1=90")
        with pytest.raises(CliError, match="no earlier revision"):
            await cli(nats_url, "rollback", "canary")


async def cli(nats_url: str, *argv: str, capsys: pytest.CaptureFixture[str] | None = None
              ) -> str:
    if capsys is not None:
        capsys.readouterr()
    args = build_parser().parse_args(["--nats", nats_url, *argv])
    assert await args.func(args) == 0
    return capsys.readouterr().out if capsys is not None else ""


async def test_a_revision_that_cannot_start_gets_no_traffic(
        nats_url: str, redis_url: str, tmp_path: Path) -> None:
    spec = sample_spec("broken", scaling=WARM)
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        await deploy(nats_url, spec)
        url = f"{stack.url}/v2/models/broken/infer"
        async with aiohttp.ClientSession() as http:
            assert (await infer(http, url))[:2] == (200, "broken-00001")
            bad = sample_spec("broken", scaling=WARM, env={"SAMPLE_FAIL_ON_START": "1"})
            await call(nats_url, DeployRequest(spec=bad, canary_percent=50))
            # requests sent while its pod fails: those drawn for it go to the other
            got = await many(http, url, 200, concurrency=16)
            assert Counter(s for s, _, _ in got) == {200: 200}
            assert {r for _, r, _ in got} == {"broken-00001"}
            st = await wait_until(lambda: describe(nats_url, "broken"),
                                  lambda s: any(r.last_error for r in s.revisions),
                                  timeout=10, what="the broken revision's error")
            again = await many(http, url, 200, concurrency=16)
        assert Counter((s, r) for s, r, _ in again) == {(200, "broken-00001"): 200}
        broken = {r.spec.name: r for r in st.revisions}["broken-00002"]
        assert broken.percent == 50 and not broken.ready and broken.last_error
        metrics = stack.activator.metrics  # type: ignore[union-attr]
        assert metrics.value("fnplane_route_revision_fallback_total", kn_service_name="broken",
                             kn_revision_name="broken-00002") > 0
        # deleting the service deletes its revisions: their pods stop, their records go
        async with admin(nats_url) as bus:
            await bus.call(ep.ADMIN_DELETE, NameRequest(name="broken"), timeout=5)
        nodes = [c for c in stack.components if isinstance(c, LocalNode)]
        await wait_until(lambda: _pods_of(nodes, "broken"), lambda pods: not pods, timeout=10,
                         what="the revisions' pods stopped")
        assert await stack.store.get_revisions("broken") == {}  # type: ignore[union-attr]


async def _pods_of(nodes: list[LocalNode], service: str) -> list[str]:
    return [p.start.pod for n in nodes for p in n.pods.values()
            if p.start.spec.revision_of == service and p.state not in ("stopped", "failed")]
