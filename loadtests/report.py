"""What the burst experiment (`loadtests.burst`) measured, turned into numbers: the records it
keeps while the stack runs, and the pure functions that summarise them. No I/O and no clock
here, so the arithmetic (percentiles, buckets, "lost") can be checked on its own."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """One request of the burst. Times are seconds since the burst started.

    `status` 0 means no HTTP answer at all (timeout, connection error): that request is
    an error *and* lost, never counted as answered."""

    sent_at: float
    latency_ms: float
    status: int
    pod: str = ""
    error: str = ""

    @property
    def answered(self) -> bool:
        return self.status > 0

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class PodSample:
    """Pods of the service as the admin `describe` API reported them at `t`."""

    t: float
    ready: int
    starting: int
    desired: int


@dataclass(frozen=True)
class BufferSample:
    """The activator's throttler for the service at `t`: requests waiting for a slot in
    its buffer, and requests holding a slot on a pod."""

    t: float
    buffered: int
    in_flight: int


@dataclass(frozen=True)
class ModeChange:
    """An `Endpoints` message from `route` whose mode or size differs from the previous."""

    t: float
    mode: str
    endpoints: int


@dataclass(frozen=True)
class PodStats:
    """A pod's own `/stats` after the burst: the peak of requests it held at once."""

    pod: str
    max_in_flight: int
    total: int


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (the value at rank ceil(pct% of n)); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def errors_by_status(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Every request that was not a 200: by HTTP status, or by the exception's name when
    no answer came back (those are the lost ones)."""
    counts: Counter[str] = Counter()
    for r in records:
        if not r.ok:
            counts[str(r.status) if r.answered else r.error or "no answer"] += 1
    return dict(sorted(counts.items()))


def latency_buckets(
    records: Sequence[RequestRecord], width_s: float = 0.5
) -> list[tuple[float, float, float, float, int]]:
    """(bucket start, p50, p95, p99, n) of answered requests, bucketed by the time each was
    sent: a cold start shows up as the slow first buckets, whenever those requests end."""
    by_bucket: dict[int, list[float]] = {}
    for r in records:
        if r.answered:
            by_bucket.setdefault(int(r.sent_at // width_s), []).append(r.latency_ms)
    rows = []
    for key in sorted(by_bucket):
        lat = by_bucket[key]
        p50, p95, p99 = (percentile(lat, p) for p in (50, 95, 99))
        assert p50 is not None and p95 is not None and p99 is not None
        rows.append((key * width_s, p50, p95, p99, len(lat)))
    return rows


def cc_violations(stats: Iterable[PodStats], container_concurrency: int) -> int:
    """Pods that ever held more requests at once than container concurrency (0 = unlimited)."""
    if container_concurrency <= 0:
        return 0
    return sum(1 for s in stats if s.max_in_flight > container_concurrency)


def first_direct(changes: Iterable[ModeChange], after: float = 0.0) -> float | None:
    """When `route` first said "direct" at or after `after` (the burst start), or None."""
    for c in changes:
        if c.mode == "direct" and c.t >= after:
            return c.t
    return None


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    pods: Sequence[PodSample],
    buffer: Sequence[BufferSample],
    modes: Sequence[ModeChange],
    pod_stats: Sequence[PodStats],
    container_concurrency: int,
    throttler_violations: int,
) -> dict[str, object]:
    """The burst half of the JSON `loadtests.burst` prints (cold start and the added-latency
    measurement are joined by the runner)."""
    answered = [r for r in records if r.answered]
    ok_latency = [r.latency_ms for r in records if r.ok]
    pod_violations = cc_violations(pod_stats, container_concurrency)
    direct_at = first_direct(modes)
    return {
        "requests": len(records),
        "ok": sum(1 for r in records if r.ok),
        "errors_by_status": errors_by_status(records),
        "lost": len(records) - len(answered),
        "p50_ms": rounded(percentile(ok_latency, 50)),
        "p95_ms": rounded(percentile(ok_latency, 95)),
        "p99_ms": rounded(percentile(ok_latency, 99)),
        "max_ms": rounded(max(ok_latency, default=None)),
        "duration_s": round(duration_s, 2),
        "throughput_rps": round(len(answered) / duration_s, 1) if duration_s > 0 else None,
        # Ready pods as `describe` counted them or as `route` published them, whichever saw
        # more: each can miss a moment the other caught.
        "max_pods": max(
            max((p.ready for p in pods), default=0),
            max((m.endpoints for m in modes), default=0),
        ),
        "max_pods_incl_starting": max((p.ready + p.starting for p in pods), default=0),
        "pods_used": len({r.pod for r in records if r.pod}),
        "max_buffered": max((b.buffered for b in buffer), default=0),
        "cc_violations": pod_violations + throttler_violations,
        "cc_violations_pods": pod_violations,
        "cc_violations_activator": throttler_violations,
        "pod_max_in_flight": {s.pod: s.max_in_flight for s in pod_stats},
        "pod_requests_total": sum(s.total for s in pod_stats),
        "time_to_direct_mode_s": rounded(direct_at, 2),
        "final_mode": modes[-1].mode if modes else None,
    }
