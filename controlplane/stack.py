"""The embedded default: NATS, Redis, the coordinator, one instance of each control function,
the local node backend and the activator, in one foreground process. Wiring only; every
decision lives in the components."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from activator.server import Activator
from controlplane import build
from controlplane.coordinator import Coordinator
from controlplane.elastic import Runtime
from controlplane.runtime import ProcessRuntime, TaskRuntime
from controlplane.servers import NatsServer, RedisServer, start_nats, start_redis
from controlplane.statedir import check_state_dir
from controlplane.supervisor import Supervisor
from functions.scale.instance import ScaleInstance
from kernel import telemetry
from kernel.component import Component
from kernel.config import Config
from kernel.identity import Credentials
from kernel.store import ROUTES, Store
from partitions.agents.kubernetes.agent import KubernetesConfig

log = logging.getLogger(__name__)


C = TypeVar("C", bound=Component)


async def _ready(component: C) -> C:
    return component


@dataclass
class Stack:
    """Start in dependency order, stop in reverse; `stop` is idempotent and always runs
    every component's stop even when one fails."""

    config: Config
    # Servers already running (tests pass their fixtures); otherwise we start our own.
    nats_url: str | None = None
    redis_url: str | None = None
    nats_port: int | None = 4222
    redis_port: int | None = None
    components: list[Component] = field(default_factory=list)
    nats: NatsServer | None = None
    redis: RedisServer | None = None
    store: Store | None = None
    activator: Activator | None = None
    coordinator: Coordinator | None = None
    runtime: Runtime | None = None
    # `nodes.backend == "kubernetes"`: where the cluster is (`fnplane up --backend kubernetes`).
    kubernetes: KubernetesConfig | None = None
    started_at: float = 0.0
    # Restarts the servers we started when they die (not the ones tests pass in).
    supervisor: Supervisor = field(default_factory=Supervisor)

    async def start(self) -> None:
        self.started_at = time.time()
        state = Path(self.config.state_dir)
        check_state_dir(state)  # before any server reads it
        try:
            await self._start(state)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, state: Path) -> None:
        cfg = self.config
        if self.nats_url is None or self.redis_url is None:
            creds, path = Credentials.ensure(state)  # made on first start, kept after
        if self.nats_url is None:
            # Our own NATS: every component kind gets its user and its permissions.
            auth = creds.server_authorization()
            self.nats = nats = await start_nats(state, port=self.nats_port, authorization=auth,
                                                tls=cfg.tls)
            self.nats_url = nats.url
            self.supervisor.watch("nats-server", nats, lambda: start_nats(
                state, port=nats.port, authorization=auth, tls=cfg.tls))
            cfg = replace(cfg, credentials=path)
        if self.redis_url is None:
            # Our own Redis: no default user; fnplane's ACL user, password in the state dir.
            self.redis = redis = await start_redis(state, port=self.redis_port,
                                                   password=creds.redis, tls=cfg.tls)
            self.redis_url = redis.url
            self.supervisor.watch("redis-server", redis, lambda: start_redis(
                state, port=redis.port, password=creds.redis, tls=cfg.tls))
        self.supervisor.on_restart = self._restarted
        self.config = cfg = replace(cfg, nats_url=self.nats_url, redis_url=self.redis_url)
        # Every cold request becomes one trace across components, written as JSON lines.
        telemetry.setup_tracing("fnplane", trace_file=cfg.trace_file or state / "traces.jsonl")
        self.store = Store.from_url(self.redis_url)
        await self.store.check_schema()
        # Local pods never outlive the stack, so routes stored by a previous run are stale.
        await self.store.r.delete(ROUTES)

        public = f"http://{cfg.activator.host}:{cfg.activator.port or 0}"
        # The coordinator starts `schedule` instances itself and scales them with their load.
        self.runtime = self._runtime(cfg)
        coordinated = await self._up(build.coordinator(cfg, public_url=public,
                                                       runtime=self.runtime))
        self.coordinator = coordinated.coordinator
        await self._up(build.route(cfg))
        await self._up(build.scale(cfg))
        if cfg.nodes.backend == "kubernetes":
            await self._up(build.kubernetes_nodes(cfg, self.kubernetes or KubernetesConfig()))
        else:
            nodes = await build.local_nodes(cfg, log_dir=state / "pods")
            await asyncio.gather(*(self._up(_ready(n)) for n in nodes))
        self.activator = await self._up(build.activator(cfg))
        coordinated.registry.public_url = self.activator.url

    def _restarted(self, name: str, server: object) -> None:
        if isinstance(server, NatsServer):
            self.nats = server
        elif isinstance(server, RedisServer):
            self.redis = server

    @staticmethod
    def _runtime(cfg: Config) -> Runtime:
        if cfg.coordinator.runtime == "processes":
            return ProcessRuntime(cfg, kinds=["schedule"])
        return TaskRuntime({"schedule": lambda: build.schedule(cfg)})

    async def _up(self, making: Awaitable[C]) -> C:
        component = await making
        self.components.append(component)
        await component.start()
        return component

    async def stop(self) -> None:
        components, self.components = self.components, []
        # Reverse start order, except that `scale` goes right after the activator: with no
        # traffic left to serve it must not place new pods on nodes that are shutting down.
        order = list(reversed(components))
        order.sort(key=lambda c: 0 if isinstance(c, Activator | ScaleInstance) else 1)
        for component in order:
            bound = 20.0
            if isinstance(component, Activator):  # its drain has its own bounds
                bound += component.config.drain_grace_s + component.config.drain_timeout_s
            try:
                await asyncio.wait_for(component.stop(), timeout=bound)
            except Exception:
                log.exception("stack: stopping %s failed", type(component).__name__)
        if self.store is not None:
            await self.store.close()
            self.store = None
        await self.supervisor.close()  # what stops now stays stopped
        for server in (self.redis, self.nats):
            if server is not None:
                await server.stop()
        self.redis = self.nats = None
        telemetry.flush()

    @property
    def url(self) -> str:
        assert self.activator is not None
        return self.activator.url
