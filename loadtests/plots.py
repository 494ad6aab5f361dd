"""PNG plots of one burst run: latency percentiles, pods, and the activator's buffer depth over
the same time axis (seconds since the burst started), one figure with three panels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt

from loadtests.report import (
    BufferSample,
    ModeChange,
    PodSample,
    RequestRecord,
    first_direct,
    latency_buckets,
)


def plot_burst(
    path: Path,
    records: Sequence[RequestRecord],
    pods: Sequence[PodSample],
    buffer: Sequence[BufferSample],
    modes: Sequence[ModeChange],
    *,
    title: str,
    cold_start_s: float | None = None,
    bucket_s: float = 0.5,
) -> Path:
    fig, (ax_lat, ax_pods, ax_buf) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    fig.suptitle(title, fontsize=11)

    rows = latency_buckets(records, bucket_s)
    if rows:
        xs = [r[0] + bucket_s / 2 for r in rows]
        for col, label, style in ((1, "p50", "-o"), (2, "p95", "-s"), (3, "p99", "-^")):
            ax_lat.plot(xs, [r[col] for r in rows], style, markersize=3, label=label)
    answered = [r for r in records if r.answered]
    ax_lat.scatter(
        [r.sent_at for r in answered],
        [r.latency_ms for r in answered],
        s=2,
        alpha=0.25,
        color="grey",
        label="each request",
    )
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency ms (log)")
    ax_lat.set_title(f"latency by send time, percentiles per {bucket_s:g} s bucket", fontsize=9)
    ax_lat.legend(loc="upper right", fontsize=8)

    ts = [p.t for p in pods]
    ax_pods.step(ts, [p.ready for p in pods], where="post", label="ready")
    ax_pods.step(
        ts,
        [p.ready + p.starting for p in pods],
        where="post",
        linestyle="--",
        label="ready + starting",
    )
    ax_pods.step(ts, [p.desired for p in pods], where="post", linestyle=":", label="desired")
    if modes:
        ax_pods.step(
            [m.t for m in modes], [m.endpoints for m in modes], where="post", alpha=0.6,
            label="endpoints published by route",
        )  # fmt: skip
    ax_pods.set_ylabel("pods")
    ax_pods.set_title("pods of the service (admin describe; route's endpoints)", fontsize=9)
    ax_pods.legend(loc="lower right", fontsize=8)

    tb = [b.t for b in buffer]
    ax_buf.plot(tb, [b.buffered for b in buffer], label="buffered (waiting for a slot)")
    ax_buf.plot(tb, [b.in_flight for b in buffer], label="in flight on pods")
    ax_buf.set_ylabel("requests")
    ax_buf.set_xlabel("seconds since the burst started")
    ax_buf.set_title("activator throttler", fontsize=9)
    ax_buf.legend(loc="upper right", fontsize=8)

    direct_at = first_direct(modes)
    for ax in (ax_lat, ax_pods, ax_buf):
        ax.grid(True, alpha=0.3)
        if cold_start_s is not None:
            ax.axvline(cold_start_s, color="red", alpha=0.5, linewidth=1)
        if direct_at is not None:
            ax.axvline(direct_at, color="green", alpha=0.5, linewidth=1)
    notes = []
    if cold_start_s is not None:
        notes.append(f"red: first cold start answered ({cold_start_s:.2f} s)")
    if direct_at is not None:
        notes.append(f"green: route switched to direct mode ({direct_at:.2f} s)")
    if notes:
        ax_pods.text(
            0.01, 0.97, "\n".join(notes), transform=ax_pods.transAxes, va="top", fontsize=8
        )

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_dataplane(path: Path, rates: Mapping[str, Mapping[str, object]]) -> Path:
    """The dataplane probe (`loadtests.dataplane`): one panel per rate, p50/p95/p99 of each
    path side by side (log scale: the 100 ms model time dwarfs what the gateway adds), the
    activator's added latency over direct-to-pod written above its bars."""
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 5), squeeze=False)
    pcts = ("p50_ms", "p95_ms", "p99_ms")
    for ax, (rate, phase) in zip(axes[0], rates.items(), strict=True):
        paths: Mapping[str, Mapping[str, object]] = phase["paths"]  # type: ignore[assignment]
        width = 0.8 / max(1, len(paths))
        for i, (name, row) in enumerate(paths.items()):
            values = [float(row[p] or 0.0) for p in pcts]  # type: ignore[arg-type]
            xs = [k + (i - (len(paths) - 1) / 2) * width for k in range(len(pcts))]
            bars = ax.bar(xs, values, width, label=f"{name} ({row['errors']} errors)")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        added: Mapping[str, object] = phase["activator_added_ms"]  # type: ignore[assignment]
        note = ", ".join(f"{p[:3]} {added[p]:+.2f}" for p in pcts if added.get(p) is not None)
        ax.set_title(f"{rate} QPS per path\nactivator adds (ms): {note}", fontsize=9)
        ax.set_xticks(range(len(pcts)), [p[:3] for p in pcts])
        ax.set_yscale("log")
        ax.set_ylabel("latency ms from scheduled send (log)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle("fnplane dataplane probe: open-loop load, three paths interleaved", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
