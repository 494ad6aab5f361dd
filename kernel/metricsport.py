"""A process's metrics port: `GET /metrics` shows every component the process runs
(kernel/metrics.py), for Prometheus to scrape. The gateway has its own `/metrics` on its
listener; the coordinator, the control-function instances and the node agents have this.
Binds 127.0.0.1 unless told otherwise; port 0 takes a free one, which `url` says."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from kernel import metrics
from kernel.config import MetricsConfig

CONTENT_TYPE = "text/plain; version=0.0.4"
# The process's metrics URL, for heartbeats to advertise: the port started last (a process
# runs one; a test process's inline stacks each start theirs in turn).
_advertised: list[str] = []


def advertised_url() -> str:
    return _advertised[-1] if _advertised else ""


class MetricsPort:
    """`only_newer`: show only components born after the port started. A process runs one
    stack, so it changes nothing there; an inline stack shares its test process with what
    earlier tests left behind, whose series are not this stack's."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 only_newer: bool = False) -> None:
        self.host = host
        self.port = port
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._older: list[metrics.Metrics] = []  # held, so their ids stay theirs
        self._older_ids: set[int] = set()
        self._only_newer = only_newer

    async def _metrics(self, _request: web.Request) -> web.Response:
        shown = [m for m in metrics.live() if id(m) not in self._older_ids]
        return web.Response(body=metrics.render(shown).encode(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> str:
        if self._only_newer:
            self._older = metrics.live()
            self._older_ids = {id(m) for m in self._older}
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.port = port
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"
        _advertised.append(self.url)
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if self.url in _advertised:
            _advertised.remove(self.url)
        if runner is not None:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def open_metrics_port(config: MetricsConfig) -> AsyncIterator[MetricsPort]:
    """The port for the block's duration; with `port == -1` none (its `url` stays "")."""
    port = MetricsPort(config.host, config.port)
    if config.port >= 0:
        await port.start()
    try:
        yield port
    finally:
        await port.stop()
