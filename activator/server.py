"""The activator process piece: the gateway plus its HTTP listener, started and stopped
together. Stopping refuses new connections first, then lets in-flight requests finish."""

from __future__ import annotations

from aiohttp import web

from activator.gateway import Gateway
from activator.ingress import build_app
from controlplane.config import ActivatorConfig


class Activator:
    kind = "activator"

    def __init__(self, nats_url: str, config: ActivatorConfig) -> None:
        self.config = config
        self.gateway = Gateway(nats_url, config)
        self._runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.gateway.start()
        self._runner = web.AppRunner(
            build_app(self.gateway), access_log=None, shutdown_timeout=10.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=2048)
        await site.start()
        if self.config.port == 0:
            server = site._server  # aiohttp keeps the bound socket there
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.gateway.stop()
