"""The activator process piece: the gateway plus its HTTP listener and NATS ingress,
started and stopped together. Stopping refuses new work on both ingresses first, then lets
in-flight requests finish while the gateway still serves them."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from activator.gateway import Gateway
from activator.ingress import build_app
from activator.nats_ingress import NatsIngress
from kernel.config import ActivatorConfig

log = logging.getLogger(__name__)


class Activator:
    kind = "activator"

    def __init__(self, nats_url: str, config: ActivatorConfig) -> None:
        self.config = config
        self.gateway = Gateway(nats_url, config)
        self.nats_ingress = (
            NatsIngress(self.gateway, nats_url, config.nats) if config.nats.enabled else None
        )
        self._runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.gateway.start()
        if self.nats_ingress is not None:
            await self.nats_ingress.start()
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
        # Both ingresses drain at once (their bounds do not add up), then the gateway.
        results = await asyncio.gather(self._stop_http(), self._stop_nats(), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("activator: stopping an ingress failed", exc_info=result)
        await self.gateway.stop()

    async def _stop_http(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _stop_nats(self) -> None:
        if self.nats_ingress is not None:
            await self.nats_ingress.stop()
