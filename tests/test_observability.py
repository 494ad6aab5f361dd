"""Seeing a cold start (knative/serving#13459 asks for a cold-start metric): one cold request
is one OpenTelemetry trace across activator, scale, schedule, node and route, joined by the
W3C traceparent carried in HTTP and NATS headers; and the activator's /metrics exposes a
cold-start histogram. Real stack, real pods."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import aiohttp

from functions.scale.instance import ScaleInstance
from kernel import endpoints as ep
from kernel import telemetry
from tests.stackutil import deploy, running_stack, sample_spec, wait_until

BODY = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                    "data": [[5.1, 3.5, 1.4, 0.2]]}]}


async def _settled(scale: ScaleInstance) -> bool:
    return bool(scale.shards.owned) and not scale._rebuilding


async def test_a_cold_request_is_one_trace_and_a_metric(
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
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v2/models/sample/infer", json=BODY) as r:
                assert r.status == 200
            async with http.get(f"{stack.url}/metrics") as r:
                metrics = await r.text()
    assert 'fnplane_cold_start_duration_count{service="sample"} 1' in metrics
    assert 'fnplane_revision_request_count{service="sample"} 1' in metrics

    telemetry.flush()
    spans = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    root = next(s for s in spans if s["name"] == "activator sample")
    trace_id = root["context"]["trace_id"]
    names = [s["name"] for s in spans if s["context"]["trace_id"] == trace_id]
    node_start_suffix = "." + ep.NODE_START.subject.split(".")[-1]  # "{node}" varies
    demand_prefix = ep.DEMAND.subject_for().rsplit(".", 1)[0] + "."  # "{shard}" varies
    for part in (demand_prefix, ep.PLACE.subject_for(), node_start_suffix,
                 ep.POD_EVENTS.subject_for(service="sample")):
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
