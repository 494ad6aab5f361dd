"""The embedded default: NATS, Redis, the coordinator, one instance of each control function,
the local node backend and the activator, in one foreground process. Wiring only; every
decision lives in the components."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from activator.server import Activator
from controlplane.coordinator import Coordinator
from controlplane.elastic import Runtime
from controlplane.registry import Registry
from controlplane.runtime import ProcessRuntime, TaskRuntime
from controlplane.servers import NatsServer, RedisServer, start_nats, start_redis
from controlplane.statedir import check_state_dir
from functions.route.instance import RouteInstance
from functions.scale.instance import ScaleInstance
from functions.schedule.instance import ScheduleInstance
from kernel import telemetry
from kernel.config import Config
from kernel.messages import NodeInfo
from kernel.store import ROUTES, Store
from partitions.agents.kubernetes.agent import KubernetesBackend, KubernetesConfig
from partitions.agents.local import LocalNode

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


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
        if self.nats_url is None:
            self.nats = await start_nats(state, port=self.nats_port)
            self.nats_url = self.nats.url
        if self.redis_url is None:
            self.redis = await start_redis(state, port=self.redis_port)
            self.redis_url = self.redis.url
        self.config = cfg = replace(cfg, nats_url=self.nats_url, redis_url=self.redis_url)
        # Every cold request becomes one trace across components, written as JSON lines.
        telemetry.setup_tracing("fnplane", trace_file=cfg.trace_file or state / "traces.jsonl")
        self.store = Store.from_url(self.redis_url)
        await self.store.check_schema()
        # Local pods never outlive the stack, so routes stored by a previous run are stale.
        await self.store.r.delete(ROUTES)

        self.activator = Activator(cfg.nats_url, cfg.activator)
        public = f"http://{cfg.activator.host}:{cfg.activator.port or 0}"
        registry = Registry(cfg.nats_url, self.store, public_url=public)
        await self._up(registry)
        # The coordinator starts `schedule` instances itself and scales them with their load.
        self.runtime = self._runtime(cfg)
        self.coordinator = Coordinator(cfg.nats_url, self.store, cfg.coordinator,
                                       runtime=self.runtime)
        await self._up(self.coordinator)
        await self._up(RouteInstance(cfg.nats_url, cfg.redis_url))
        await self._up(
            ScaleInstance(
                cfg.nats_url, cfg.scale, metrics_interval_s=cfg.activator.metrics_interval_s
            )
        )
        if cfg.nodes.backend == "kubernetes":
            await self._up(KubernetesBackend(cfg.nats_url, self.kubernetes or KubernetesConfig()))
        else:
            nodes = [
                LocalNode(
                    cfg.nats_url,
                    NodeInfo(name=f"node-{i}", capacity=cfg.nodes.capacity, backend="local"),
                    workdir=cfg.nodes.workdir,
                    log_dir=state / "pods",
                )
                for i in range(cfg.nodes.count)
            ]
            await asyncio.gather(*(self._up(n) for n in nodes))
        await self._up(self.activator)
        registry.public_url = self.activator.url

    @staticmethod
    def _runtime(cfg: Config) -> Runtime:
        if cfg.coordinator.runtime == "processes":
            return ProcessRuntime(cfg.nats_url, cfg.redis_url, kinds=["schedule"])
        return TaskRuntime({"schedule": lambda: ScheduleInstance(cfg.nats_url, cfg.schedule)})

    async def _up(self, component: Component) -> None:
        self.components.append(component)
        await component.start()

    async def stop(self) -> None:
        components, self.components = self.components, []
        # Reverse start order, except that `scale` goes right after the activator: with no
        # traffic left to serve it must not place new pods on nodes that are shutting down.
        order = list(reversed(components))
        order.sort(key=lambda c: 0 if isinstance(c, Activator | ScaleInstance) else 1)
        for component in order:
            try:
                await asyncio.wait_for(component.stop(), timeout=20.0)
            except Exception:
                log.exception("stack: stopping %s failed", type(component).__name__)
        if self.store is not None:
            await self.store.close()
            self.store = None
        for server in (self.redis, self.nats):
            if server is not None:
                await server.stop()
        self.redis = self.nats = None
        telemetry.flush()

    @property
    def url(self) -> str:
        assert self.activator is not None
        return self.activator.url
