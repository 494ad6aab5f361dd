"""The embedded default: NATS, Redis, the coordinator, the control functions, the node agents
and the gateway. `fnplane up` runs each role as a process of its own, supervised
(`roles="processes"`); tests run them all on one event loop (`roles="inline"`) to look
inside. Wiring only; every decision lives in the components."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import msgspec

from activator.server import Activator
from controlplane import build
from controlplane.coordinator import Coordinator
from controlplane.elastic import Runtime
from controlplane.role import KUBERNETES_ENV, RoleProcess, start_role
from controlplane.runtime import ProcessRuntime, TaskRuntime
from controlplane.servers import NatsServer, RedisServer, start_nats, start_redis
from controlplane.statedir import check_state_dir
from controlplane.supervisor import Supervisor
from functions.scale.instance import ScaleInstance
from kernel import endpoints as ep
from kernel import telemetry
from kernel.bus import Bus
from kernel.component import Component
from kernel.config import Config
from kernel.errors import RemoteError
from kernel.identity import Credentials, login
from kernel.messages import ClusterStatus, Empty
from kernel.metricsport import MetricsPort
from kernel.procs import ServerStartError, free_port, hostport
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
    # Restarts the servers we started when they die (not the ones tests pass in), and the
    # role processes.
    supervisor: Supervisor = field(default_factory=Supervisor)
    # "inline": every component on this event loop (tests look inside it); "processes":
    # the coordinator, the node agents and each gateway worker as processes of their own,
    # as `fnplane up` runs them (`controlplane/role.py`).
    roles: str = "inline"
    gateway_workers: int = 1
    role_processes: dict[str, RoleProcess] = field(default_factory=dict)
    public_url: str = ""
    # Inline, every component shows on this one port (the process's, kernel/metricsport.py);
    # with role processes each process has its own (`role_processes[name].metrics_url`).
    metrics_port: MetricsPort | None = None

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
        if self.roles == "processes":
            await self._start_roles(state)
            return
        if cfg.metrics.port >= 0:
            self.metrics_port = MetricsPort(cfg.metrics.host, cfg.metrics.port,
                                            only_newer=True)
            await self.metrics_port.start()

        public = f"http://{cfg.activator.host}:{cfg.activator.port or 0}"
        # The coordinator starts `schedule` instances itself and scales them with their load.
        self.runtime = self._runtime(cfg)
        coordinated = await self._up(build.coordinator(cfg, public_url=public,
                                                       runtime=self.runtime))
        self.coordinator = coordinated.coordinator
        # `scale` and `route` are sharded by service; inline, their minimum runs here (the
        # coordinator's runtime scales them in `--roles processes`).
        for _ in range(cfg.coordinator.route_min):
            await self._up(build.route(cfg))
        for _ in range(cfg.coordinator.scale_min):
            await self._up(build.scale(cfg))
        if cfg.nodes.backend == "kubernetes":
            await self._up(build.kubernetes_nodes(cfg, self.kubernetes or KubernetesConfig()))
        else:
            nodes = await build.local_nodes(cfg, log_dir=state / "pods")
            await asyncio.gather(*(self._up(_ready(n)) for n in nodes))
        self.activator = await self._up(build.activator(cfg))
        coordinated.registry.public_url = self.activator.url

    async def _start_roles(self, state: Path) -> None:
        """One process per role, in dependency order, each restarted when it dies. The
        coordinator starts, counts and replaces the control-function instances itself."""
        cfg = self.config
        act = cfg.activator
        port = act.port or free_port(act.host)  # every worker must bind the same one
        # The gRPC port too (-1: none).
        grpc_port = act.grpc_port if act.grpc_port != 0 else free_port(act.host)
        self.config = cfg = replace(
            cfg, activator=replace(act, port=port, workers=self.gateway_workers,
                                   grpc_port=grpc_port),
            coordinator=replace(cfg.coordinator, runtime="processes"))
        self.public_url = f"http://{hostport(act.host, port)}"
        env = {"FNPLANE_PUBLIC_URL": self.public_url}
        if self.kubernetes is not None:
            env[KUBERNETES_ENV] = msgspec.json.encode(self.kubernetes).decode()
        plan = [("coordinator", "coordinator", 0), ("nodes", "nodes", 0)]
        plan += [("activator", f"gateway-{i}", i) for i in range(self.gateway_workers)]

        async def up(role: str, name: str, worker: int) -> None:
            def start() -> Awaitable[RoleProcess]:
                return start_role(role, cfg, name=name, worker=worker, env=env,
                                  log_dir=state / "logs")
            proc = self.role_processes[name] = await start()
            self.supervisor.watch(name, proc, start)

        # All at once: each waits for what it needs over NATS (node agents retry their
        # registration, gateways catch up on services), and Python's start-up is the cost.
        results = await asyncio.gather(*(up(*p) for p in plan), return_exceptions=True)
        for failed in (r for r in results if isinstance(r, BaseException)):
            raise failed
        await self._wait_serving(cfg)

    async def _wait_serving(self, cfg: Config, timeout: float = 60.0) -> None:
        """Until the control plane can serve a cold start: the instances the coordinator
        starts after it is up (scale, route, schedule with a partition) beat, and the
        node agents registered. Ready roles are not yet a ready stack."""
        assert self.nats_url is not None
        who = login(cfg.credentials, "admin") if cfg.credentials else None
        bus = await Bus.connect(self.nats_url, f"stack-{os.getpid()}", login=who)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    st: ClusterStatus = await bus.call(ep.ADMIN_STATUS, Empty(), timeout=1.0)
                    kinds = {i.kind for i in st.instances}
                    owned = st.partitions.partitions and all(
                        p.owner for p in st.partitions.partitions)
                    nodes = cfg.nodes.backend != "local" or len(
                        st.partitions.nodes) >= cfg.nodes.count
                    if {"scale", "route", "schedule"} <= kinds and owned and nodes:
                        return
                except RemoteError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(f"the control plane was not serving {timeout:g}s "
                                           "after its processes started (see <state-dir>/logs)")
                await asyncio.sleep(0.1)
        finally:
            await bus.close()

    def _restarted(self, name: str, server: object) -> None:
        if isinstance(server, NatsServer):
            self.nats = server
        elif isinstance(server, RedisServer):
            self.redis = server
        elif isinstance(server, RoleProcess):
            self.role_processes[name] = server

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
        await self.supervisor.close()  # what stops now stays stopped
        # Roles: the gateway workers drain first, then the coordinator (and the instances
        # it runs), then the node agents with their pods.
        roles, self.role_processes = self.role_processes, {}
        gateways = [p for p in roles.values() if p.role == "activator"]
        await asyncio.gather(*(p.stop() for p in gateways), return_exceptions=True)
        for role in ("coordinator", "nodes"):
            for p in roles.values():
                if p.role == role:
                    await p.stop()
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
        for server in (self.redis, self.nats):
            if server is not None:
                await server.stop()
        self.redis = self.nats = None
        if self.metrics_port is not None:
            await self.metrics_port.stop()
            self.metrics_port = None
        telemetry.flush()

    def metrics_urls(self) -> dict[str, str]:
        """Where to scrape this stack: process name → its metrics URL."""
        urls = {name: p.metrics_url for name, p in self.role_processes.items() if p.metrics_url}
        urls.update({name: f"{p.own_url}/metrics" for name, p in self.role_processes.items()
                     if p.own_url})
        if self.metrics_port is not None and self.metrics_port.url:
            urls["stack"] = self.metrics_port.url
        return urls

    async def instance_metrics_urls(self) -> dict[str, str]:
        """Each control-function instance's metrics URL, as its heartbeat says: the ones the
        coordinator started as processes have ports only they know. Instances come and go
        with load; this is now (`fnplane status` lists them at any time)."""
        assert self.nats_url is not None
        creds = self.config.credentials
        bus = await Bus.connect(self.nats_url, f"stack-{os.getpid()}",
                                login=login(creds, "admin") if creds else None)
        try:
            st: ClusterStatus = await bus.call(ep.ADMIN_STATUS, Empty(), timeout=5.0)
        finally:
            await bus.close()
        return {i.instance: i.metrics_url for i in st.instances if i.metrics_url}

    @property
    def grpc_address(self) -> str:
        """host:port of the gateway's Open Inference Protocol gRPC port ("" without one)."""
        if self.activator is not None:
            return self.activator.grpc_address
        act = self.config.activator
        return hostport(act.host, act.grpc_port) if act.grpc_port > 0 else ""

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url
        assert self.activator is not None
        return self.activator.url
