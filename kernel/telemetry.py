"""Traces and metrics. A cold request is one OpenTelemetry trace whose context travels in
HTTP and NATS headers (W3C `traceparent`); metrics are Knative-named counters and histograms
in an `fnplane.` namespace, exposed in Prometheus text format by the activator's `/metrics`.

The metrics registry is a small hand-written one: what we need is a handful of labelled
counters, gauges and histograms in one process, and the OpenTelemetry Prometheus exporter
would pull in prometheus_client and a second HTTP server for that.
"""

from __future__ import annotations

import bisect
import contextlib
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


_exporter = JsonLinesExporter()
_processor: BatchSpanProcessor | None = None


def setup_tracing(service_name: str = "fnplane", *, trace_file: Path | None = None) -> None:
    """Install the tracer provider once per process, and send spans to `trace_file`."""
    global _processor
    if _processor is None:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        _processor = BatchSpanProcessor(_exporter, schedule_delay_millis=500)
        provider.add_span_processor(_processor)
        trace.set_tracer_provider(provider)
    _exporter.path = trace_file


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


# ---- metrics ------------------------------------------------------------------------------

LabelKey = tuple[tuple[str, str], ...]

DEFAULT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Registry:
    """Counters, gauges and histograms keyed by name and labels; thread-safe enough for
    one event loop plus the occasional reader."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[LabelKey, float]] = {}
        self._gauges: dict[str, dict[LabelKey, float]] = {}
        self._hists: dict[str, dict[LabelKey, list[float]]] = {}
        self._help: dict[str, str] = {}

    @staticmethod
    def _key(labels: Mapping[str, str]) -> LabelKey:
        return tuple(sorted(labels.items()))

    def inc(self, name: str, value: float = 1.0, help: str = "", **labels: str) -> None:
        series = self._counters.setdefault(name, {})
        key = self._key(labels)
        series[key] = series.get(key, 0.0) + value
        self._help.setdefault(name, help)

    def set(self, name: str, value: float, help: str = "", **labels: str) -> None:
        self._gauges.setdefault(name, {})[self._key(labels)] = value
        self._help.setdefault(name, help)

    def observe(self, name: str, value: float, help: str = "", **labels: str) -> None:
        series = self._hists.setdefault(name, {})
        counts = series.setdefault(self._key(labels), [0.0] * (len(DEFAULT_BUCKETS_S) + 2))
        counts[bisect.bisect_left(DEFAULT_BUCKETS_S, value)] += 1
        counts[-1] += value  # running sum in the last slot
        self._help.setdefault(name, help)

    def counter(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(self._key(labels), 0.0)

    def render(self) -> str:
        """Prometheus text exposition; dots become underscores as OTel's exporter does."""
        out: list[str] = []

        def fmt(key: LabelKey, extra: str = "") -> str:
            parts = [f'{k}="{v}"' for k, v in key]
            if extra:
                parts.append(extra)
            return "{" + ",".join(parts) + "}" if parts else ""

        for kind, table in (("counter", self._counters), ("gauge", self._gauges)):
            for name, series in sorted(table.items()):
                prom = name.replace(".", "_")
                out.append(f"# HELP {prom} {self._help.get(name, '')}")
                out.append(f"# TYPE {prom} {kind}")
                out.extend(f"{prom}{fmt(k)} {v:g}" for k, v in series.items())
        for name, series in sorted(self._hists.items()):
            prom = name.replace(".", "_")
            out.append(f"# HELP {prom} {self._help.get(name, '')}")
            out.append(f"# TYPE {prom} histogram")
            for key, counts in series.items():
                cumulative = 0.0
                for bound, n in zip(DEFAULT_BUCKETS_S, counts, strict=False):
                    cumulative += n
                    le = f'le="{bound:g}"'
                    out.append(f"{prom}_bucket{fmt(key, le)} {cumulative:g}")
                cumulative += counts[len(DEFAULT_BUCKETS_S)]
                inf = 'le="+Inf"'
                out.append(f"{prom}_bucket{fmt(key, inf)} {cumulative:g}")
                out.append(f"{prom}_count{fmt(key)} {cumulative:g}")
                out.append(f"{prom}_sum{fmt(key)} {counts[-1]:g}")
        return "\n".join(out) + "\n"
