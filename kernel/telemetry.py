"""Traces. A cold request is one OpenTelemetry trace whose context travels in HTTP and NATS
headers (W3C `traceparent`). Spans go to a JSON-lines file (the embedded default) and over
OTLP/HTTP when the standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` says where; the SDK
honours `OTEL_TRACES_SAMPLER` (default: parent-based, always on) and `OTEL_SERVICE_NAME`.
Metrics are in kernel/metrics.py."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util import ns_to_iso_str
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
tracer = trace.get_tracer("fnplane")


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line: enough to read a cold
    start's tree offline without running a collector. The target can be switched (each
    embedded stack writes under its own state dir) because OpenTelemetry allows one tracer
    provider per process."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self.path is None:
                return SpanExportResult.SUCCESS
            with self.path.open("ab") as f:
                f.write(b"".join(span_line(span) for span in spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


_resources: dict[int, tuple[Resource, object]] = {}


def span_line(span: ReadableSpan) -> bytes:
    """One span as a JSON line, the same document as `span.to_json()`, at a fraction of its
    cost: encoded by msgspec, with the resource (the same for every span of a process)
    decoded once (~13 µs a span against ~48 µs). The exporter thread holds the GIL while it
    encodes: with `to_json` it took 11% of the gateway's samples in issue 11's profile,
    every one of them time the event loop could not run."""
    resource = span.resource
    cached = _resources.get(id(resource))
    if cached is None or cached[0] is not resource:
        cached = _resources[id(resource)] = (resource, msgspec.json.decode(resource.to_json()))
    ctx, parent = span.context, span.parent
    status: dict[str, str] = {"status_code": span.status.status_code.name}
    if span.status.description:
        status["description"] = span.status.description
    doc = {
        "name": span.name,
        "context": _context(ctx) if ctx else None,
        "kind": str(span.kind),
        "parent_id": f"0x{trace.format_span_id(parent.span_id)}" if parent else None,
        "start_time": ns_to_iso_str(span.start_time) if span.start_time else None,
        "end_time": ns_to_iso_str(span.end_time) if span.end_time else None,
        "status": status,
        "attributes": _attributes(span.attributes),
        "events": [{"name": e.name, "timestamp": ns_to_iso_str(e.timestamp),
                    "attributes": _attributes(e.attributes)} for e in span.events],
        "links": [{"context": _context(link.context), "attributes": _attributes(link.attributes)}
                  for link in span.links],
        "resource": cached[1],
    }
    return msgspec.json.encode(doc) + b"\n"


def _context(ctx: trace.SpanContext) -> dict[str, str]:
    return {"trace_id": f"0x{trace.format_trace_id(ctx.trace_id)}",
            "span_id": f"0x{trace.format_span_id(ctx.span_id)}",
            "trace_state": repr(ctx.trace_state)}


def _attributes(attributes: Mapping[str, object] | None) -> dict[str, object] | None:
    return dict(attributes) if attributes is not None else None


def otlp_traces_endpoint() -> str:
    """Where OTLP/HTTP traces go, by the standard variables; "" for nowhere."""
    env = os.environ
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip() == "none":
        return ""
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return base.rstrip("/") + "/v1/traces"
    return ""


class Exporters(SpanExporter):
    """The file and, when configured, OTLP: one batch processor (one thread) feeds both.
    Either can be switched while the process runs (one tracer provider per process, many
    embedded stacks in a test run)."""

    def __init__(self) -> None:
        self.file = JsonLinesExporter()
        self.otlp: SpanExporter | None = None
        self.otlp_endpoint = ""

    def use_otlp(self, endpoint: str) -> None:
        if endpoint == self.otlp_endpoint:
            return
        old, self.otlp, self.otlp_endpoint = self.otlp, None, ""
        if old is not None:
            old.shutdown()
        if not endpoint:
            return
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:  # the exporter is a dependency; a trimmed install may lack it
            return
        self.otlp, self.otlp_endpoint = OTLPSpanExporter(endpoint=endpoint), endpoint

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.file.export(spans)
        if (otlp := self.otlp) is not None and otlp.export(spans) is not SpanExportResult.SUCCESS:
            result = SpanExportResult.FAILURE
        return result

    def shutdown(self) -> None:
        self.use_otlp("")


_exporter = Exporters()
_processor: BatchSpanProcessor | None = None


def setup_tracing(service_name: str = "fnplane", *, trace_file: Path | None = None) -> None:
    """Install the tracer provider once per process (its sampler from `OTEL_TRACES_SAMPLER`),
    send spans to `trace_file`, and over OTLP when the environment says where."""
    global _processor
    if _processor is None:
        # OTEL_SERVICE_NAME, when set, names the process instead.
        named = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        provider = TracerProvider(resource=Resource.create(named))
        _processor = BatchSpanProcessor(_exporter, schedule_delay_millis=500)
        provider.add_span_processor(_processor)
        trace.set_tracer_provider(provider)
    _exporter.file.path = trace_file
    _exporter.use_otlp(otlp_traces_endpoint())


def tracing_wanted(trace_file: Path | None) -> bool:
    """A role or instance process traces when told where to: a trace file in its config,
    or an OTLP endpoint (the embedded inline stack always writes its file)."""
    return trace_file is not None or bool(otlp_traces_endpoint())


def flush() -> None:
    if _processor is not None:
        _processor.force_flush(timeout_millis=5000)


def inject(headers: dict[str, str]) -> None:
    _propagator.inject(headers)


@contextlib.contextmanager
def continue_trace(headers: Mapping[str, str] | None, name: str) -> Iterator[None]:
    """Run a handler inside the caller's trace when the message carries one."""
    if not headers or "traceparent" not in headers:
        yield
        return
    ctx = _propagator.extract(dict(headers))
    with tracer.start_as_current_span(name, context=ctx):
        yield


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
