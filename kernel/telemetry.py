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

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
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
            with self.path.open("a") as f:
                for span in spans:
                    f.write(span.to_json(indent=None) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


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
