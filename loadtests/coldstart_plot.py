"""The PNG of `loadtests.coldstart_parallel`: per size, time to first answer (p50, p95, max)
against the CPU floor; the p95 of each cold-start stage; and, for the largest size, every
pod's cold start as a bar from request to first byte, split by stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt

from kernel.messages import ColdStart
from loadtests.coldstart_report import STAGES

COLOURS = ("tab:blue", "tab:purple", "tab:orange", "tab:green", "tab:red")


def plot_coldstarts(path: Path, cases: Sequence[dict[str, object]]) -> Path:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5.5))
    sizes = [int(str(c["services"])) for c in cases]
    x = range(len(cases))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("max_ms", "^-")):
        ax1.plot(x, [_num(c[key]) for c in cases], style, label=key.removesuffix("_ms"))
    ax1.plot(x, [_num(c["cpu_floor_ms"]) for c in cases], "k--", label="CPU floor")
    ax1.set_xticks(list(x), [str(s) for s in sizes])
    ax1.set_xlabel("services woken at once")
    ax1.set_ylabel("time to first answer (ms)")
    ax1.set_title("time to first answer")
    ax1.legend()

    width = 0.8 / len(STAGES)
    for i, stage in enumerate(STAGES):
        vals = []
        for c in cases:
            p95 = c["stage_p95_ms"]
            assert isinstance(p95, dict)
            vals.append(_num(p95.get(stage)))
        ax2.bar([j + i * width for j in x], vals, width, label=stage, color=COLOURS[i])
    ax2.set_xticks([j + 0.4 - width / 2 for j in x], [str(s) for s in sizes])
    ax2.set_xlabel("services woken at once")
    ax2.set_ylabel("p95 (ms)")
    ax2.set_yscale("symlog", linthresh=10)
    ax2.set_title("p95 of each cold-start stage")
    ax2.legend(fontsize="small")

    last = cases[-1]
    colds = last["cold_starts"]
    assert isinstance(colds, list)
    _timeline(ax3, colds)
    ax3.set_title(f"every cold start of {last['services']} (s since the first request)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _timeline(ax: plt.Axes, colds: Sequence[ColdStart]) -> None:
    if not colds:
        return
    t0 = min(c.request_in for c in colds)
    for row, c in enumerate(sorted(colds, key=lambda c: c.request_in)):
        marks = [c.request_in, c.placement_decided, c.fetched, c.process_spawned, c.ready,
                 c.first_byte_out]
        for i in range(len(STAGES)):
            a, b = marks[i], marks[i + 1]
            if a and b:
                ax.barh(row, b - a, left=a - t0, color=COLOURS[i], height=0.8,
                        label=STAGES[i] if row == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("pod")
    ax.legend(fontsize="small", loc="lower right")


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")
