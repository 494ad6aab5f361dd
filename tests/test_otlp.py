"""OTLP: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, one cold request's spans, and every
component's metrics, reach an OpenTelemetry collector. The collector here is a small
in-process OTLP/HTTP receiver (http.server, in a thread) decoding `ExportTraceServiceRequest`
and `ExportMetricsServiceRequest` protobufs (a real Jaeger or Tempo cannot run here); the
stack, its pods and the exporters are the real ones."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from functions.scale.instance import ScaleInstance
from kernel import telemetry
from tests.stackutil import deploy, running_stack, sample_spec, wait_until
from tests.test_observability import BODY, _settled, assert_every_component

Span = tuple[str, str, str]  # trace id (hex), span name, service.name


@dataclass
class Received:
    spans: list[Span] = field(default_factory=list)
    metrics: set[str] = field(default_factory=set)  # instrument names pushed


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver of traces and metrics on a free local port, in a thread of its
    own (the stack's stop flushes from the event loop's thread, blocking it): (its base
    URL, what it received so far)."""
    got = Received()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = self.headers["Content-Type"] == "application/x-protobuf"
            if ok and self.path == "/v1/traces":
                traces = ExportTraceServiceRequest.FromString(body)
                for rs in traces.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes
                                    if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        got.spans.extend((s.trace_id.hex(), s.name, service) for s in ss.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
            elif ok and self.path == "/v1/metrics":
                pushed = ExportMetricsServiceRequest.FromString(body)
                got.metrics.update(m.name for rm in pushed.resource_metrics
                                   for sm in rm.scope_metrics for m in sm.metrics)
                reply = ExportMetricsServiceResponse().SerializeToString()
            else:
                ok, reply = False, b""
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", got
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_a_cold_request_reaches_an_otlp_collector(
    nats_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with otlp_receiver() as (endpoint, got):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        try:
            async with running_stack(nats_url, redis_url, tmp_path) as stack:
                scale = next(c for c in stack.components if isinstance(c, ScaleInstance))
                await wait_until(lambda: _settled(scale), bool, timeout=10,
                                 what="scale owning its shards")
                await deploy(nats_url, sample_spec())
                async with aiohttp.ClientSession() as http:
                    async with http.post(f"{stack.url}/v2/models/sample/infer",
                                         json=BODY) as r:
                        assert r.status == 200
            # The stack's stop flushed the batch; the exporter posts from its own thread.
            root = await wait_until(
                lambda: asyncio.sleep(0, [s for s in got.spans
                                          if s[1] == "activator sample"]),
                bool, timeout=10, what="the cold request's root span over OTLP")
        finally:
            # Later stacks in this process must not export to a receiver that is gone.
            monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
            telemetry.setup_tracing(trace_file=None)
    trace_id = root[0][0]
    assert_every_component([name for t, name, _ in got.spans if t == trace_id])
    assert {service for t, _, service in got.spans if t == trace_id} == {"fnplane"}
    # Metrics were pushed too (each component's last export, as it stopped).
    assert {"fnplane.cold_starts", "fnplane.schedule.placements",
            "fnplane.revision.pods.desired",
            "fnplane.schedule.placement.duration"} <= got.metrics, got.metrics  # hot, too
    # The file stays the embedded default, OTLP or not.
    assert (tmp_path / "traces.jsonl").stat().st_size > 0
