"""Seeing a cold start (knative/serving#13459 asks for a cold-start metric): one cold request
is one OpenTelemetry trace across activator, scale, schedule, node and route, joined by the
W3C traceparent carried in HTTP and NATS headers; and every component's metrics, scraped in
Prometheus format and read by prometheus_client's own parser, count it. Real stack, real
pods."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import sys
from pathlib import Path

import aiohttp

from controlplane import dashboard
from functions.scale.instance import ScaleInstance
from kernel import endpoints as ep
from kernel import telemetry
from kernel.errors import ErrorCode, RemoteError
from kernel.messages import ClusterStatus, Empty, StartPod
from kernel.metrics import scrape
from tests.stackutil import admin, deploy, running_stack, sample_spec, wait_until

BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}


async def _settled(scale: ScaleInstance) -> bool:
    return bool(scale.shards.owned) and not scale._rebuilding


# The service label, as Prometheus shows Knative's `kn.service.name`.
SAMPLE = {"kn_service_name": "sample"}
# scale, schedule, the nodes and route run revisions: their series name both, as Knative's.
SAMPLE_REVISION = {"kn_service_name": "sample", "kn_revision_name": "sample-00001"}
BROKEN = {"kn_service_name": "broken"}

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def total(series: Series, name: str, **labels: str) -> float:
    return sum(v for (n, have), v in series.items()
               if n == name and labels.items() <= dict(have).items())


def has(series: Series, name: str, **labels: str) -> bool:
    return any(n == name and labels.items() <= dict(have).items() for n, have in series)


class DesiredPods:
    """`fnplane_revision_pods_desired` of the sample service, scraped from the stack's
    metrics port every 0.2 s: None while the series does not exist yet."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.seen: list[float | None] = []

    async def follow(self) -> None:
        while True:
            async with self.http.get(self.url) as r:
                series = scrape(await r.text())
            name = "fnplane_revision_pods_desired"
            got = has(series, name, **SAMPLE_REVISION)
            value = total(series, name, **SAMPLE_REVISION) if got else None
            if not self.seen or self.seen[-1] != value:
                self.seen.append(value)  # changes only
            await asyncio.sleep(0.2)

    def went_up_and_back(self) -> bool:
        """0 (or no series yet), then at least 1, then 0 again."""
        values = self.seen
        up = next((i for i, v in enumerate(values) if v is not None and v >= 1), None)
        if up is None or values[-1] != 0:
            return False
        return all(v in (None, 0) for v in values[:up])


async def _refused_start(nats_url: str) -> None:
    """A start from a stale owner of a node's partition (epoch -1): the node refuses it."""
    async with admin(nats_url) as bus:
        st: ClusterStatus = await bus.call(ep.ADMIN_STATUS, Empty(), timeout=5)
        part = next(p for p in st.partitions.partitions if p.nodes)
        node = part.nodes[0]
        stale = StartPod(pod="stale-1", spec=sample_spec(), node=node, requested_at=0.0,
                         placed_at=0.0, partition=part.id, epoch=-1)
        try:
            await bus.call(ep.NODE_START, stale, timeout=5, node=node)
        except RemoteError as exc:
            assert exc.code is ErrorCode.STALE_EPOCH
        else:
            raise AssertionError("a start at a stale epoch was accepted")


async def test_a_cold_request_is_one_trace_and_metrics_on_every_component(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running_stack(nats_url, redis_url, tmp_path) as stack:
        # The trace is whole once `scale` owns its shards: demand that arrives while a new
        # owner gathers a shard's pods (its first 0.3 s) is acted on at the next tick,
        # outside the request's trace.
        scale = next(c for c in stack.components if isinstance(c, ScaleInstance))
        await wait_until(lambda: _settled(scale), bool, timeout=10,
                         what="scale owning its shards")
        await deploy(nats_url, sample_spec())
        infer = f"{stack.url}/v2/models/sample/infer"
        async with aiohttp.ClientSession() as http:
            # Desired pods as Prometheus would see them, scraped all along (sample_spec's
            # 1 s scale-to-zero grace brings them back to 0 once the stable window passes).
            desired = DesiredPods(http, stack.metrics_urls()["stack"])
            sampler = asyncio.create_task(desired.follow(), name="desired-pods-scraper")
            async with http.post(infer, json=BODY) as r:
                assert r.status == 200
            async with http.get(f"{stack.url}/metrics") as r:
                gateway = scrape(await r.text())

            async def one() -> int:
                async with http.post(infer, json=BODY) as r:
                    return r.status

            burst = await asyncio.gather(*(one() for _ in range(30)))
            assert burst == [200] * 30
            # A service whose pod dies at start: its waiting request is refused, counted.
            await deploy(nats_url, sample_spec(
                "broken", command=[sys.executable, "-c", "raise SystemExit(3)"]))
            async with http.post(f"{stack.url}/v2/models/broken/infer", json=BODY) as r:
                assert r.status == 503
            await _refused_start(nats_url)
            # The whole process's port: every component, each series by `component`.
            urls = stack.metrics_urls()
            async with http.get(urls["stack"]) as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                every = scrape(await r.text())
            try:
                await wait_until(lambda: asyncio.sleep(0, desired.went_up_and_back()), bool,
                                 timeout=30, what=f"desired pods back to 0: {desired.seen}")
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            async with http.get(urls["stack"]) as r:
                after = scrape(await r.text())

    # The gateway's own /metrics: the cold request, counted once, stage by stage.
    assert total(gateway, "fnplane_cold_starts_total", **SAMPLE) == 1
    assert total(gateway, "fnplane_cold_start_duration_seconds_count", **SAMPLE) == 1
    assert total(gateway, "fnplane_revision_requests_total", **SAMPLE) == 1
    for stage in ("placement", "weights_fetch", "spawn", "ready", "first_byte"):
        assert total(gateway, "fnplane_cold_start_stage_duration_seconds_count",
                     **SAMPLE, stage=stage) == 1, stage
    # Every component of the stack shows on the process's port.
    components = {dict(labels)["component"].split("-", 1)[0] for _, labels in every}
    assert {"activator", "coordinator", "registry", "scale", "schedule", "route",
            "node"} <= components, components
    assert total(every, "fnplane_revision_requests_total", **SAMPLE) == 31
    assert total(every, "fnplane_cold_starts_total", **SAMPLE) == 1
    # schedule placed the cold start's pod, and timed it.
    assert total(every, "fnplane_schedule_placements_total", outcome="placed") >= 1
    assert total(every, "fnplane_schedule_placement_duration_seconds_count") >= 1
    assert has(every, "fnplane_schedule_partition_epoch")
    # scale's desired pods went from 0 up (a decision counted), and the gauges show them.
    assert total(every, "fnplane_scale_decisions_total", **SAMPLE_REVISION, direction="up") >= 1
    assert has(every, "fnplane_revision_pods_desired", **SAMPLE_REVISION)
    assert has(every, "fnplane_revision_pods_count", **SAMPLE_REVISION)
    assert has(every, "fnplane_revision_panic_mode", **SAMPLE_REVISION)
    # ...and back to 0 once traffic stopped: the gauge read 0 → n → 0 while it happened.
    assert desired.went_up_and_back(), desired.seen
    assert total(after, "fnplane_revision_pods_desired", **SAMPLE_REVISION) == 0
    assert total(after, "fnplane_scale_decisions_total", **SAMPLE_REVISION, direction="down") >= 1
    # The coordinator: partitions and shards got owners, with epochs; live instances.
    assert total(every, "fnplane_partition_ownership_changes_total") >= 1
    assert has(every, "fnplane_partition_epoch")
    assert total(every, "fnplane_shard_ownership_changes_total", kind="scale") >= 1
    assert total(every, "fnplane_instances", kind="schedule") >= 1
    # Nodes started the pod(s) and refused the stale start; route published endpoints;
    # the registry took the deploy.
    assert total(every, "fnplane_node_pods_started_total", **SAMPLE_REVISION) >= 1
    assert total(every, "fnplane_node_refusals_total", reason="stale_epoch", op="start") == 1
    assert total(every, "fnplane_route_updates_total", **SAMPLE_REVISION) >= 1
    assert total(every, "fnplane_registry_deploys_total") == 2
    assert total(every, "fnplane_activator_rejected_total", **BROKEN,
                 reason="start_failed") == 1
    # Every query of the Grafana dashboard reads series this scrape saw.
    seen = {name for name, _ in every}
    assert dashboard.series_named(dashboard.dashboard()) <= seen, (
        dashboard.series_named(dashboard.dashboard()) - seen)

    telemetry.flush()
    spans = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    root = next(s for s in spans if s["name"] == "activator sample")
    trace_id = root["context"]["trace_id"]
    assert_every_component([s["name"] for s in spans if s["context"]["trace_id"] == trace_id])


def assert_every_component(names: list[str]) -> None:
    """One cold request's span names cover the activator, scale, schedule, the node and
    route."""
    assert "activator sample" in names
    node_start_suffix = "." + ep.NODE_START.subject.split(".")[-1]  # "{node}" varies
    demand_prefix = ep.DEMAND.subject_for().rsplit(".", 1)[0] + "."  # "{shard}" varies
    for part in (demand_prefix, ep.PLACE.subject_for(), node_start_suffix,
                 ep.POD_EVENTS.subject_for(service="sample-00001")):
        # A `*` in a subject stands for the token that varies (the partition, here).
        assert any(fnmatch.fnmatchcase(n, f"*{part}*") for n in names), (
            f"no span for {part} in the trace: {names}")


def test_the_trace_file_holds_what_opentelemetry_would_write() -> None:
    """`span_line` replaces `span.to_json()` on the warm path for speed; the document a
    reader of traces.jsonl gets must stay the same, field for field."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, Status, StatusCode

    tracer = TracerProvider(resource=Resource.create({"service.name": "t"})).get_tracer("t")
    with tracer.start_as_current_span("activator sample") as root:
        with tracer.start_as_current_span("child", links=[Link(root.get_span_context(),
                                                                {"n": 1})]) as child:
            child.set_attribute("fnplane.path", "direct")
            child.set_attribute("sizes", (1, 2))
            child.add_event("retry", {"pod": "p1"})
            child.set_status(Status(StatusCode.ERROR, "pod unreachable"))
    for span in (root, child):
        line = telemetry.span_line(span)  # type: ignore[arg-type]
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line) == json.loads(span.to_json())  # type: ignore[attr-defined]
