"""The PNG of `loadtests.coldstart`: per scenario the total cold start (p50, p99, mean) with the
cache hit rate on a second axis, and the p50 of each cold-start stage stacked, so the weights'
fetch shows as the part a cache takes away."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt

from loadtests.coldstart_report import STAGES

COLOURS = ("tab:blue", "tab:purple", "tab:orange", "tab:green", "tab:red")


def _num(v: object) -> float:
    return float(v) if isinstance(v, int | float) else 0.0


def plot_cache(path: Path, scenarios: Mapping[str, Mapping[str, object]], title: str) -> Path:
    names = list(scenarios)
    x = range(len(names))
    labels = [n.replace("cycling_locality_", "cycling\nlocality ").replace("_", " ")
              for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.27
    for i, (key, label) in enumerate((("total_p50_ms", "p50"), ("total_p99_ms", "p99"),
                                      ("total_mean_ms", "mean"))):
        ax1.bar([j + (i - 1) * width for j in x], [_num(scenarios[n][key]) for n in names],
                width, label=label)
    ax1.set_xticks(list(x), labels, fontsize=8)
    ax1.set_ylabel("total cold start (ms)")
    ax1.set_title("total cold start per scenario")
    ax1.legend(loc="upper left")
    hits = ax1.twinx()
    hits.plot(list(x), [_num(scenarios[n]["cache_hit_rate"]) for n in names], "ko--",
              label="cache hit rate")
    hits.set_ylim(0, 1.05)
    hits.set_ylabel("cache hit rate")
    hits.legend(loc="upper right")

    bottom = [0.0] * len(names)
    for stage, colour in zip(STAGES, COLOURS, strict=True):
        vals = []
        for n in names:
            p50 = scenarios[n]["stage_p50_ms"]
            assert isinstance(p50, dict)
            vals.append(_num(p50.get(stage)))
        ax2.bar(list(x), vals, 0.6, bottom=bottom, label=stage, color=colour)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_ylabel("ms (p50 of each stage)")
    ax2.set_title("cold start by stage")
    ax2.legend(fontsize=8)
    fig.suptitle(f"cold start with a node model cache: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
