"""The activator component, wired: the service table kept current by `ServiceSync`, the
request handler, the demand reporter, the HTTP listener and the NATS ingress, started and
stopped together. Stopping turns readiness false at once, keeps serving for the drain grace
(load balancers notice), refuses new work on both ingresses, then lets in-flight requests
finish while the handler still serves them. Wiring only; no decision here."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from activator import openai
from activator.direct import DirectPath
from activator.handler import Handler
from activator.ingress import BodyBudget, ReadyCheck, build_app
from activator.listener import LINGERING_TIME_S, ConnectionGuard, GuardedSite, connection_cap
from activator.nats_ingress import NatsIngress
from activator.proxy import Proxy
from activator.reporter import DemandReporter
from activator.services import ServiceTable
from activator.sync import ServiceSync
from activator.workers import Worker
from kernel import endpoints as ep
from kernel.bus import Bus
from kernel.component import Component
from kernel.config import ActivatorConfig
from kernel.limits import open_files_limit
from kernel.messages import KeyRevoked

if TYPE_CHECKING:  # imported when configured: grpc, protobuf and numpy cost every worker
    from activator.keygate import KeyGate  # a tenth of a second at start
    from activator.oipgrpc.ingress import GrpcIngress
    from kernel.store import Store

log = logging.getLogger(__name__)


class Activator(Component):
    kind = "activator"

    def __init__(self, bus: Bus, config: ActivatorConfig, *, store: Store | None = None) -> None:
        """`store`: where API keys and their buckets are (needed with keys on; closed by
        `stop`)."""
        super().__init__(bus)
        self.config = config
        if config.keys.enabled and store is None:
            raise ValueError("API keys on: the activator needs the Redis store")
        self.store = store
        self.gate: KeyGate | None = None
        self.port = config.port
        self.own_url = ""  # with several workers: this worker's own listener
        self.direct = DirectPath()
        worker = Worker(config.worker, config.workers)
        self.direct.worker = worker
        self.services = ServiceTable(buffer_size=config.buffer_size, direct=self.direct,
                                     worker=worker)
        cap = connection_cap(config.max_connections, open_files_limit(), config.fd_reserve)
        if cap < config.max_connections:
            log.warning("activator: %d connections at most, not %d: the open-files limit is "
                        "%d and %d descriptors stay for the rest of the process", cap,
                        config.max_connections, open_files_limit(), config.fd_reserve)
        self.guard = ConnectionGuard(cap=cap, header_timeout_s=config.header_timeout_s,
                                     retry_after_s=config.retry_after_s)
        # As many connections to pods as from clients, at most: the descriptor budget.
        self.proxy = Proxy(timeout_s=config.pod_timeout_s, max_connections=cap)
        self.bodies = BodyBudget(config.max_body_bytes_in_flight)
        self.ready: ReadyCheck | None = None
        self.handler: Handler | None = None
        self.nats_ingress: NatsIngress | None = None
        self.grpc_ingress: GrpcIngress | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC ingress ("" without one)."""
        return self.grpc_ingress.address if self.grpc_ingress is not None else ""

    async def start(self) -> None:
        await self.proxy.start()
        bus = self.bus
        sync = ServiceSync(bus, self.services, self.tasks, log_id=self.id)
        reporter = DemandReporter(bus, self.id, self.services, self.direct, self.metrics,
                                  self.tasks, interval_s=self.config.metrics_interval_s)
        self.handler = handler = Handler(self.config, self.services, self.proxy, self.direct,
                                         reporter, self.metrics, lookup=sync.lookup,
                                         log_id=self.id)
        await sync.start()
        self.tasks.spawn(reporter.run(), name="report")
        middlewares = [self.guard.middleware]
        if self.config.keys.enabled and self.store is not None:
            from activator.keygate import KeyGate

            self.gate = KeyGate(self.store, self.metrics, cache_ttl_s=self.config.keys.cache_ttl_s,
                                retry_after=self.config.retry_after_s)
            await bus.serve(ep.KEY_REVOKED, self._on_key_revoked)
            middlewares.append(self.gate.middleware())
        if self.config.nats.enabled:
            self.nats_ingress = NatsIngress(handler, bus, self.config.nats)
            self.nats_ingress.gate = self.gate.admit if self.gate is not None else None
            await self.nats_ingress.start()
        self.ready = ready = ReadyCheck(lambda: not bus.nc.is_closed and bus.nc.is_connected)
        app = build_app(handler, ready=ready, bodies=self.bodies, middlewares=middlewares)
        openai.add_routes(app, self.gate)
        cfg = self.config
        # handler_cancellation: a client that disconnects cancels its request, as a Go
        # server's context does in Knative's activator: a request buffered for a pod at zero
        # leaves the buffer instead of reaching the pod for nobody.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.drain_timeout_s,
                                     keepalive_timeout=cfg.keepalive_timeout_s,
                                     lingering_time=LINGERING_TIME_S, handler_cancellation=True)
        await self._runner.setup()
        shared = cfg.workers > 1
        site = GuardedSite(self._runner, cfg.host, cfg.port, self.guard, backlog=2048,
                           reuse_port=shared)
        await site.start()
        self.port = site.port
        if shared:
            # The shared port reaches any worker; this one is ours alone (its /metrics).
            own = GuardedSite(self._runner, cfg.host, 0, self.guard, backlog=128)
            await own.start()
            self.own_url = f"http://{cfg.host}:{own.port}"
        if cfg.grpc_port >= 0:
            from activator.oipgrpc.ingress import GrpcIngress

            self.grpc_ingress = GrpcIngress(
                handler, ready, cfg, bodies=self.bodies,
                gate=self.gate.admit if self.gate is not None else None)
            await self.grpc_ingress.start()

    async def stop(self) -> None:
        self.guard.draining = True
        if self.ready is not None and not self.ready.draining:
            self.ready.draining = True
            if self.config.drain_grace_s > 0:
                await asyncio.sleep(self.config.drain_grace_s)
        # Both ingresses drain at once (their bounds do not add up), then the rest.
        results = await asyncio.gather(self._stop_http(), self._stop_nats(),
                                       self._stop_grpc(), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("activator: stopping an ingress failed", exc_info=result)
        for batcher in self.services.take_batchers():
            await batcher.close(timeout=5.0)
        await self.tasks.close(timeout=1.0)
        self.services.fail_all("the activator is shutting down")
        await super().stop()
        await self.proxy.close()
        if self.store is not None:
            store, self.store = self.store, None
            await store.close()

    async def _on_key_revoked(self, msg: KeyRevoked, _raw: object) -> None:
        if self.gate is not None:
            self.gate.forget(msg.id)

    async def _stop_http(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _stop_grpc(self) -> None:
        if self.grpc_ingress is not None:
            await self.grpc_ingress.stop()

    async def _stop_nats(self) -> None:
        if self.nats_ingress is not None:
            await self.nats_ingress.stop()
