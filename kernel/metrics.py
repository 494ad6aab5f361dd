"""Metrics through the OpenTelemetry metrics SDK. Every component owns a `Metrics`: its own
`MeterProvider` with a pull reader (and an OTLP push reader when `OTEL_EXPORTER_OTLP_ENDPOINT`
says so). A process shows the metrics of all the components it runs in Prometheus text
format (`render`), each series labelled with its `component`: `fnplane up --roles inline`
runs every component in one process, so one global provider would mix their counts.

Names follow Knative's OpenTelemetry ones in an `fnplane.` namespace and are declared once,
in `CATALOGUE`, with their unit and help text; the Prometheus name adds what OpenTelemetry's
Prometheus exporter adds (dots to underscores, the unit's suffix, `_total` on counters), and
`prom_name` says which. The README's table and the Grafana dashboard are written from it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    NoOpMeterProvider,
    Observation,
    UpDownCounter,
    _Gauge,
)
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    InMemoryMetricReader,
    Metric,
    MetricReader,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from prometheus_client.core import Metric as PromMetric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from kernel.hothistogram import HotHistogram, WithHot
from kernel.revisions import parent_of

# Seconds: from a warm proxy hop to a cold start that downloads weights.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60)


@dataclass(frozen=True)
class Instrument:
    name: str
    kind: str  # counter, updown, gauge, histogram
    unit: str  # UCUM; `{thing}` annotations add no Prometheus suffix
    help: str
    labels: tuple[str, ...] = ()  # besides `component`


# Attribute names: Knative Serving's OpenTelemetry ones where Knative has one
# (knative/serving pkg/metrics/newkey.go, and its serving-metrics reference: `kn.service.name`
# on revision and autoscaler metrics, `http.response.status_code` on invocation metrics);
# Prometheus shows them with dots as underscores (`kn_service_name`). An fnplane service is
# Knative's service and configuration at once; `kn.revision.name` waits for revisions.
SERVICE = "kn.service.name"
REVISION = "kn.revision.name"
STATUS_CODE = "http.response.status_code"


def _i(name: str, kind: str, unit: str, help: str, *labels: str) -> Instrument:
    return Instrument(name, kind, unit, help, labels)


CATALOGUE: tuple[Instrument, ...] = (
    # the gateway (activator), per service
    _i("fnplane.revision.requests", "counter", "{request}",
       "Requests the gateway admitted for a service, buffered or direct.", SERVICE),
    _i("fnplane.revision.request.queued", "gauge", "{request}",
       "Requests buffered in the gateway waiting for a pod.", SERVICE),
    _i("fnplane.revision.request.concurrency", "gauge", "{request}",
       "Requests the gateway has in flight to a service's pods.", SERVICE),
    _i("fnplane.serving.invocation.duration", "histogram", "s",
       "Time from a request's arrival at the gateway to its answer (path=direct: proxied "
       "straight to a pod).", SERVICE, "path"),
    _i("fnplane.serving.first_byte.duration", "histogram", "s",
       "Time from a request's arrival at the gateway to the pod's first byte (a streamed "
       "answer's first token; path=direct: proxied straight to a pod).", SERVICE, "path"),
    _i("fnplane.serving.timeouts", "counter", "{request}",
       "Requests cut by one of their service's timeouts (timeout: timeoutSeconds, "
       "responseStartTimeoutSeconds, idleTimeoutSeconds), answered 504 or cut mid-stream.",
       SERVICE, REVISION, "timeout"),
    _i("fnplane.activator.rejected", "counter", "{request}",
       "Requests the gateway refused, by reason.", SERVICE, REVISION, "reason"),
    _i("fnplane.gateway.direct.requests", "counter", "{request}",
       "Requests proxied straight to a pod, the activator out of the path.", SERVICE),
    _i("fnplane.activator.events", "counter", "{event}",
       "Pod events the gateway consumed from JetStream, by outcome.", SERVICE, "outcome"),
    _i("fnplane.activator.events.lag", "gauge", "{event}",
       "JetStream consumer lag: pod events published but not yet consumed.", SERVICE),
    _i("fnplane.activator.nats.requests", "counter", "{request}",
       "Inference requests that arrived over NATS, by answer status.", SERVICE,
       STATUS_CODE),
    _i("fnplane.activator.nats.dropped", "counter", "{request}",
       "NATS requests dropped without an answer, by reason.", "reason"),
    _i("fnplane.activator.grpc.requests", "counter", "{request}",
       "Open Inference Protocol gRPC calls, by method and answer status.", "method", "status"),
    _i("fnplane.gateway.key.requests", "counter", "{request}",
       "Model requests by API key id (never the key) and the gate's outcome: ok, "
       "rate_limited, wrong_service, revoked, unknown.", "key", SERVICE, "outcome"),
    _i("fnplane.cold_starts", "counter", "{cold_start}",
       "Cold starts: the first request a new pod answered.", SERVICE),
    _i("fnplane.cold_start.duration", "histogram", "s",
       "A cold request's time from arrival to first byte out.", SERVICE),
    _i("fnplane.cold_start.stage.duration", "histogram", "s",
       "A cold start's stages: placement, weights_fetch, spawn, ready, first_byte.",
       SERVICE, "stage"),
    # scale
    _i("fnplane.revision.pods.desired", "gauge", "{pod}",
       "Pods the autoscaler wants for a revision.", SERVICE, REVISION),
    _i("fnplane.revision.pods.count", "gauge", "{pod}",
       "Pods a revision has (starting or ready), as scale sees them.", SERVICE, REVISION),
    _i("fnplane.revision.panic.mode", "gauge", "",
       "1 while the autoscaler is in panic mode for a revision, else 0.", SERVICE, REVISION),
    _i("fnplane.scale.decisions", "counter", "{decision}",
       "Changes of a revision's desired pods, by direction (up, down).", SERVICE, REVISION,
       "direction"),
    # schedule
    _i("fnplane.schedule.placements", "counter", "{placement}",
       "Placement requests answered, by outcome (placed, unschedulable).", "outcome"),
    _i("fnplane.schedule.placement.duration", "histogram", "s",
       "Time to answer a placement request."),
    _i("fnplane.schedule.unschedulable", "counter", "{placement}",
       "Pods no partition had room for.", SERVICE, REVISION),
    _i("fnplane.schedule.probes", "counter", "{probe}",
       "Reserve probes sent to other partitions' owners, by outcome.", "outcome"),
    _i("fnplane.schedule.probe_cache.lookups", "counter", "{lookup}",
       "Probe-cache lookups for another partition with room, by result (hit, miss).",
       "result"),
    _i("fnplane.schedule.partition.epoch", "gauge", "",
       "The epoch of the partition this schedule instance owns.", "partition"),
    # coordinator
    _i("fnplane.partition.map.changes", "counter", "{change}",
       "Partition map versions the coordinator published."),
    _i("fnplane.partition.map.version", "gauge", "", "The partition map's version."),
    _i("fnplane.partition.ownership.changes", "counter", "{change}",
       "Partitions that changed owner.", "partition"),
    _i("fnplane.partition.epoch", "gauge", "",
       "A partition's current epoch (fencing: stale owners are refused).", "partition"),
    _i("fnplane.shard.ownership.changes", "counter", "{change}",
       "Service shards of scale and route that changed owner.", "kind"),
    _i("fnplane.shard.map.version", "gauge", "", "The shard map's version."),
    _i("fnplane.instances", "gauge", "{instance}",
       "Live instances per control function.", "kind"),
    # node agents
    _i("fnplane.node.refusals", "counter", "{request}",
       "Starts and stops a node refused (a stale owner's: reason stale_epoch), by op.",
       "reason", "op"),
    _i("fnplane.node.pods.started", "counter", "{pod}", "Pods a node started.", SERVICE,
       REVISION),
    # route
    _i("fnplane.route.updates", "counter", "{update}",
       "Endpoint sets route published to the gateways.", SERVICE, REVISION),
    # registry
    _i("fnplane.registry.deploys", "counter", "{deploy}", "Services deployed or updated."),
    # revisions (kernel/revisions.py)
    _i("fnplane.route.revision.requests", "counter", "{request}",
       "Requests the activator sent to each revision of a service, by how it chose it "
       "(split, tag, version).", SERVICE, REVISION, "via"),
    _i("fnplane.route.revision.fallback", "counter", "{request}",
       "Requests drawn over a split whose revision fails to start: its share went to the "
       "other revisions.", SERVICE, REVISION),
    _i("fnplane.registry.traffic.changes", "counter", "{change}",
       "Traffic splits changed by `fnplane traffic` or `rollback`.", SERVICE, "rollback"),
)
BY_NAME = {i.name: i for i in CATALOGUE}

# What OpenTelemetry's Prometheus exporter appends for a unit (the compatibility spec).
_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prom_name(inst: Instrument) -> str:
    """The name Prometheus sees for the family; a counter's samples add `_total`."""
    name = _BAD.sub("_", inst.name)
    suffix = _UNIT_SUFFIX.get(inst.unit, "")
    if suffix and not name.endswith("_" + suffix):
        name += "_" + suffix
    return name


def prom_sample_names(inst: Instrument) -> list[str]:
    """The sample names a scrape shows for this instrument."""
    base = prom_name(inst)
    if inst.kind == "counter":
        return [base + "_total"]
    if inst.kind == "histogram":
        return [base + "_bucket", base + "_count", base + "_sum"]
    return [base]


def revision_labels(name: str, **fixed: str) -> dict[str, str]:
    """Knative's pair for what scale, schedule, the nodes and route run: a revision
    (`NAME-0000N`, kernel/revisions.py) is `kn.revision.name`, its service
    `kn.service.name`; a name that is no revision's is the service's alone."""
    parent = parent_of(name)
    if parent:
        return {**fixed, SERVICE: parent, REVISION: name}
    return {**fixed, SERVICE: name}


class RevisionLabels(dict[str, Mapping[str, str]]):
    """`revision_labels` per name, built once (see LabelCache)."""

    def __init__(self, **fixed: str) -> None:
        super().__init__()
        self._fixed = fixed

    def __missing__(self, name: str) -> Mapping[str, str]:
        attrs = self[name] = revision_labels(name, **self._fixed)
        return attrs


class LabelCache(dict[str, Mapping[str, str]]):
    """One attribute set per value of one label, built once: hot paths (a request, a
    placement) pass the cached mapping instead of building a dict per call."""

    def __init__(self, key: str, **fixed: str) -> None:
        super().__init__()
        self._key = key
        self._fixed = fixed

    def __missing__(self, value: str) -> Mapping[str, str]:
        attrs = self[value] = {**self._fixed, self._key: value}
        return attrs


def disabled() -> bool:
    """`OTEL_SDK_DISABLED=true` (the standard variable) turns metrics into no-ops, traces
    too; `FNPLANE_METRICS=off` metrics alone, traces kept: what loadtests/metrics_cost.py
    compares against, so the figure is the metrics' cost and not the traces'."""
    env = os.environ
    return (env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
            or env.get("FNPLANE_METRICS", "").strip().lower() == "off")


def _otlp_reader(hot: Callable[[], list[Metric]], resource: Resource) -> MetricReader | None:
    """Push over OTLP/HTTP when the standard variables ask for it and the exporter is
    installed; Prometheus pull stays on either way. `hot`: the hot histograms, added to
    each export."""
    env = os.environ
    wanted = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not wanted or env.get("OTEL_METRICS_EXPORTER", "otlp").strip() == "none":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        return None
    return PeriodicExportingMetricReader(WithHot(OTLPMetricExporter(), hot, resource))


class HotCounter:
    """A counter for the request and placement paths, by one label: `add` is a dict update
    (~0.1 µs), where an SDK counter's `add` validates and hashes its attributes on every
    call (~6 µs). The SDK reads the running totals through an observable counter when it
    collects, so the exported series is the same."""

    def __init__(self, label: str, fixed: Mapping[str, str]) -> None:
        self.label = label
        self.fixed = dict(fixed)
        self.totals: dict[str, float] = {}

    def add(self, key: str, amount: float = 1.0) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + amount

    def observe(self, _options: CallbackOptions) -> Iterator[Observation]:
        for key, total in list(self.totals.items()):
            yield Observation(total, {**self.fixed, self.label: key})


_live: list[Metrics] = []
_live_lock = threading.Lock()


class Metrics:
    """One component's instruments, created on first use from `CATALOGUE`."""

    def __init__(self, component: str, kind: str = "") -> None:
        self.component = component
        self.kind = kind or component.split("-", 1)[0]
        self._reader: InMemoryMetricReader | None = None
        if disabled():
            self._provider: MeterProvider | NoOpMeterProvider = NoOpMeterProvider()
        else:
            self._reader = InMemoryMetricReader()
            readers: list[MetricReader] = [self._reader]
            resource = Resource.create({"service.name": f"fnplane-{self.kind}",
                                        "service.instance.id": component})
            if (otlp := _otlp_reader(self.hot_metrics, resource)) is not None:
                readers.append(otlp)
            # Closed by its component's stop; an atexit hook per component would keep every
            # provider a test run ever made alive until the end.
            # Exemplars off unless OTEL_METRICS_EXEMPLAR_FILTER asks: the text format shows
            # none, and the trace-based default samples one on every traced request.
            wanted = os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER")
            self._provider = MeterProvider(
                metric_readers=readers, resource=resource, shutdown_on_exit=False,
                exemplar_filter=None if wanted else AlwaysOffExemplarFilter())
            with _live_lock:
                _live.append(self)
        self._meter = self._provider.get_meter("fnplane")
        self._made: dict[str, object] = {}
        self._hot: list[HotHistogram] = []

    def _make(self, name: str, kind: str) -> object:
        made = self._made.get(name)
        if made is not None:
            if isinstance(made, (HotCounter, HotHistogram)):
                raise TypeError(f"{name} is a hot instrument here")
            return made
        inst = BY_NAME[name]
        if inst.kind != kind:
            raise TypeError(f"{name} is a {inst.kind}, not a {kind}")
        m = self._meter
        if kind == "counter":
            made = m.create_counter(name, unit=inst.unit, description=inst.help)
        elif kind == "updown":
            made = m.create_up_down_counter(name, unit=inst.unit, description=inst.help)
        elif kind == "gauge":
            made = m.create_gauge(name, unit=inst.unit, description=inst.help)
        else:
            made = m.create_histogram(
                name, unit=inst.unit, description=inst.help,
                explicit_bucket_boundaries_advisory=SECONDS_BUCKETS if inst.unit == "s"
                else None)
        self._made[name] = made
        return made

    def counter(self, name: str) -> Counter:
        return self._make(name, "counter")  # type: ignore[return-value]

    def hot_counter(self, name: str, label: str, **fixed: str) -> HotCounter:
        """`name` counted by `label` on a hot path (see HotCounter); one per name."""
        made = self._made.get(name)
        if isinstance(made, HotCounter):
            if (made.label, made.fixed) != (label, fixed):
                raise TypeError(f"{name}: counted by other labels already")
            return made
        inst = BY_NAME[name]
        if made is not None or inst.kind != "counter":
            raise TypeError(f"{name} is a {inst.kind} made another way already")
        hot = HotCounter(label, fixed)
        self._meter.create_observable_counter(name, callbacks=[hot.observe], unit=inst.unit,
                                              description=inst.help)
        self._made[name] = hot
        return hot

    def hot_histogram(self, name: str, **fixed: str) -> HotHistogram:
        """`name` on a hot path, one series (see kernel/hothistogram.py); one per name."""
        made = self._made.get(name)
        if isinstance(made, HotHistogram):
            if made.attributes != fixed:
                raise TypeError(f"{name}: made with other attributes already")
            return made
        inst = BY_NAME[name]
        if made is not None or inst.kind != "histogram":
            raise TypeError(f"{name} is a {inst.kind} made another way already")
        hot = HotHistogram(name, inst.unit, inst.help,
                           SECONDS_BUCKETS if inst.unit == "s" else (), fixed)
        self._made[name] = hot
        self._hot.append(hot)
        return hot

    def hot_metrics(self) -> list[Metric]:
        return [h.metric() for h in self._hot]

    def updown(self, name: str) -> UpDownCounter:
        return self._make(name, "updown")  # type: ignore[return-value]

    def gauge(self, name: str) -> _Gauge:
        return self._make(name, "gauge")  # type: ignore[return-value]

    def histogram(self, name: str) -> Histogram:
        return self._make(name, "histogram")  # type: ignore[return-value]

    def render(self) -> str:
        return render([self])

    def value(self, sample: str, **labels: str) -> float:
        """The sum of this component's samples named `sample` (as Prometheus shows them)
        whose labels include `labels`: for tests and `fnplane describe`, never a hot path."""
        return sum(v for (name, have), v in scrape(self.render()).items()
                   if name == sample and labels.items() <= dict(have).items())

    def close(self) -> None:
        """Idempotent: the component's series leave the process's exposition."""
        with _live_lock:
            if self in _live:
                _live.remove(self)
        provider, self._provider = self._provider, NoOpMeterProvider()
        self._reader = None
        if isinstance(provider, MeterProvider):
            provider.shutdown(timeout_millis=2000)


def live() -> list[Metrics]:
    """Every component's metrics in this process (what its metrics port shows)."""
    with _live_lock:
        return list(_live)


class _Collector(Collector):
    """Reads the components' readers at scrape time and merges same-named instruments into
    one Prometheus family, told apart by the `component` label."""

    def __init__(self, sources: Sequence[Metrics]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[PromMetric]:
        families: dict[str, PromMetric] = {}
        for source in self.sources:
            if source._reader is None:
                continue
            data = source._reader.get_metrics_data()
            for rm in data.resource_metrics if data is not None else ():
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        _add(families, source.component, metric.name, metric.data)
            for hot in source.hot_metrics():
                if hot.data.data_points:  # as the SDK shows nothing of an unused instrument
                    _add(families, source.component, hot.name, hot.data)
        yield from families.values()


def _labels(attributes: Mapping[str, object] | None, component: str) -> dict[str, str]:
    labels = {_BAD.sub("_", k): str(v) for k, v in (attributes or {}).items()}
    labels["component"] = component
    return labels


def _add(families: dict[str, PromMetric], component: str, name: str, data: object) -> None:
    inst = BY_NAME.get(name)
    if inst is None:
        return
    base = prom_name(inst)
    if isinstance(data, HistogramData):
        fam = families.get(base) or families.setdefault(base, PromMetric(base, inst.help,
                                                                     "histogram"))
        for p in data.data_points:
            labels = _labels(p.attributes, component)
            cumulative = 0
            for bound, n in zip(p.explicit_bounds, p.bucket_counts, strict=False):
                cumulative += n
                fam.add_sample(base + "_bucket", {**labels, "le": _le(bound)}, cumulative)
            fam.add_sample(base + "_bucket", {**labels, "le": "+Inf"}, p.count)
            fam.add_sample(base + "_count", labels, p.count)
            fam.add_sample(base + "_sum", labels, p.sum)
        return
    if isinstance(data, Sum):
        typ = "counter" if data.is_monotonic else "gauge"
    elif isinstance(data, Gauge):
        typ = "gauge"
    else:
        return
    fam = families.get(base) or families.setdefault(base, PromMetric(base, inst.help, typ))
    sample = base + "_total" if typ == "counter" else base
    for p in data.data_points:
        fam.add_sample(sample, _labels(p.attributes, component), p.value)


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{float(bound)}"


def render(sources: Iterable[Metrics] | None = None) -> str:
    """Prometheus text exposition (format 0.0.4) of these components, or of the process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(list(live() if sources is None else sources)))
    return generate_latest(registry).decode()


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A Prometheus exposition as {(sample name, labels): value}, by prometheus_client's
    own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def markdown_table() -> str:
    """The README's table of every series, as Prometheus shows it (`python -m
    kernel.metrics` prints it; a test keeps the README in step)."""
    rows = ["| Prometheus series | type | unit | labels (and `component`) | what |",
            "|---|---|---|---|---|"]
    for inst in CATALOGUE:
        names = ", ".join(f"`{n}`" for n in prom_sample_names(inst))
        kind = {"updown": "gauge"}.get(inst.kind, inst.kind)
        labels = ", ".join(_BAD.sub("_", label) for label in inst.labels) or "–"
        rows.append(f"| {names} | {kind} | {inst.unit or '–'} | {labels} | {inst.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
