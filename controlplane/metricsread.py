"""What `fnplane describe` and `fnplane status` show of the metrics: the same series Prometheus
scrapes (kernel/metrics.py), read from the same endpoints, so the CLI and a dashboard never
disagree on how many cold starts a service had or how many pods scale wants.

Where the CLI scrapes: the gateway's `/metrics` at the service URL's origin (the address
users send inference to, so a remote CLI can reach it as they can) and each control-function
instance's metrics URL as its heartbeat advertised it (`fnplane status` lists them). Those
are 127.0.0.1 ports with `fnplane up`, reachable from the same machine only; on Kubernetes
the port binds 0.0.0.0 and advertises just that, of no use off the pod's node. So every
scrape is bounded (a second), what cannot be reached is named and skipped, never waited for,
and `--metrics-url` (repeatable) replaces the discovered list: point it at Prometheus's
`/federate?match[]={__name__=~"fnplane_.*"}`, one reachable URL that carries every
component's series, from anywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from kernel.metrics import scrape

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
SCRAPE_TIMEOUT_S = 1.0


@dataclass
class Scraped:
    series: Series = field(default_factory=dict)
    read: list[str] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # url → why

    def line(self) -> str:
        """One line saying where the figures come from, and what could not be read."""
        text = f"scraped {len(self.read)} metrics endpoint(s)"
        if self.unreachable:
            text += f"; unreachable: {', '.join(sorted(self.unreachable))}"
        return text


def gateway_metrics_url(service_url: str) -> str:
    """The gateway's `/metrics`, at the origin of a service's URL."""
    parts = urlsplit(service_url)
    return f"{parts.scheme}://{parts.netloc}/metrics" if parts.scheme and parts.netloc else ""


async def scrape_all(urls: Iterable[str], *, timeout_s: float = SCRAPE_TIMEOUT_S) -> Scraped:
    """Every URL at once, each bounded; one component's series are labelled by it, so
    merging endpoints that show the same component (an inline stack's gateway and its
    port) cannot double-count: the second copy of a sample replaces the first."""
    wanted = list(dict.fromkeys(u for u in urls if u))
    out = Scraped()
    if not wanted:
        return out
    limit = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=limit) as http:

        async def one(url: str) -> tuple[str, str | None, str]:
            try:
                async with http.get(url) as r:
                    if r.status != 200:
                        return url, None, f"HTTP {r.status}"
                    return url, await r.text(), ""
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return url, None, type(exc).__name__

        for url, text, why in await asyncio.gather(*(one(u) for u in wanted)):
            if text is None:
                out.unreachable[url] = why
                continue
            try:
                out.series.update(scrape(text))
            except ValueError:
                out.unreachable[url] = "not a Prometheus exposition"
                continue
            out.read.append(url)
    return out


def _match(series: Series, name: str, labels: dict[str, str]) -> list[float]:
    return [v for (n, have), v in series.items()
            if n == name and labels.items() <= dict(have).items()]


def total(series: Series, name: str, **labels: str) -> float | None:
    """A counter summed over every component that has it; None when none does."""
    got = _match(series, name, labels)
    return sum(got) if got else None


def highest(series: Series, name: str, **labels: str) -> float | None:
    """A gauge: the highest any component shows; None when none shows it. Only the owner
    of a service's shard sets its gauges, but a previous owner keeps showing the last value
    it set: until that instance restarts, the figure can be that stale value where it is
    the higher one (a summed gauge would count it every time)."""
    got = _match(series, name, labels)
    return max(got) if got else None


def per_revision(series: Series, name: str, **labels: str) -> float | None:
    """A gauge of a service's revisions (`kn_revision_name`): the highest any component
    shows for each revision (as `highest`), added up over the revisions."""
    by_revision: dict[str, float] = {}
    for (n, have), v in series.items():
        d = dict(have)
        if n == name and labels.items() <= d.items():
            rev = d.get(REVISION_LABEL, "")
            by_revision[rev] = max(v, by_revision.get(rev, v))
    return sum(by_revision.values()) if by_revision else None


SERVICE_LABEL = "kn_service_name"
REVISION_LABEL = "kn_revision_name"


def service_figures(series: Series, name: str) -> list[tuple[str, float | None]]:
    """(what, value) for one service, in the order `describe` prints them."""
    svc = {SERVICE_LABEL: name}
    return [
        ("requests", total(series, "fnplane_revision_requests_total", **svc)),
        ("cold starts", total(series, "fnplane_cold_starts_total", **svc)),
        ("refused", total(series, "fnplane_activator_rejected_total", **svc)),
        ("desired pods", per_revision(series, "fnplane_revision_pods_desired", **svc)),
        ("pods (scale)", per_revision(series, "fnplane_revision_pods_count", **svc)),
        ("buffered", total(series, "fnplane_revision_request_queued", **svc)),
        ("panic", highest(series, "fnplane_revision_panic_mode", **svc)),
    ]


def plane_figures(series: Series) -> list[tuple[str, float | None]]:
    """(what, value) for the control plane, in the order `status` prints them."""
    return [
        ("placements", total(series, "fnplane_schedule_placements_total", outcome="placed")),
        ("unschedulable", total(series, "fnplane_schedule_placements_total",
                                outcome="unschedulable")),
        ("probes", total(series, "fnplane_schedule_probes_total")),
        ("probe-cache hits", total(series, "fnplane_schedule_probe_cache_lookups_total",
                                   result="hit")),
        ("partition map changes", total(series, "fnplane_partition_map_changes_total")),
        ("partition owner changes", total(series, "fnplane_partition_ownership_changes_total")),
        ("node refusals", total(series, "fnplane_node_refusals_total")),
    ]


def render(figures: Sequence[tuple[str, float | None]]) -> str:
    """"what n, what n, …"; a figure no endpoint showed reads "?"."""
    return ", ".join(f"{what} {'?' if v is None else f'{v:g}'}" for what, v in figures)
