"""One way to build any fnplane component from one `Config`: `fnplane up` (stack.py), the
container entry (component.py), the instance process (instance.py) and the instance
runtimes all build here, so a setting means the same wherever a component runs. Each
component gets its own connected bus, named by its id. Wiring only.

Imports are made inside each builder: an instance process imports only what its kind needs
(a `schedule` process that imported the activator, aiohttp and the kubernetes client as well
had twice the live objects, and the garbage collector's pauses cost it a quarter of its
placement rate in the scheduler benchmark)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kernel.bus import Bus
from kernel.component import Component
from kernel.config import Config, ConfigError
from kernel.identity import login
from kernel.messages import NodeInfo

if TYPE_CHECKING:
    from activator.server import Activator
    from controlplane.coordinator import Coordinator
    from controlplane.elastic import Runtime
    from controlplane.operator import FnServiceOperator, OperatorConfig
    from controlplane.registry import Registry
    from functions.route.instance import RouteInstance
    from functions.scale.instance import ScaleInstance
    from functions.schedule.baselines import CentralScheduler, SamplingScheduler
    from functions.schedule.instance import ScheduleInstance
    from kernel.store import Store
    from partitions.agents.kubernetes.agent import KubernetesBackend, KubernetesConfig
    from partitions.agents.local import LocalNode
    from partitions.modelcache.policy import UriPolicy
    from partitions.modelcache.store import ModelCache


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:6]}"


async def connect(config: Config, name: str, kind: str) -> Bus:
    """A connection as `kind`, with that kind's credentials when NATS asks for them, over
    TLS when the Config names a CA."""
    return await Bus.connect(config.nats_url, name, login=login(config.credentials, kind),
                             tls=config.tls.client_context())


# ---- control-function instances (what a runtime scales) ---------------------------------------


async def scale(config: Config, instance_id: str = "") -> ScaleInstance:
    from functions.scale.instance import ScaleInstance
    bus = await connect(config, instance_id or new_id("scale"), "scale")
    return ScaleInstance(bus, config.scale, metrics_interval_s=config.activator.metrics_interval_s)


async def schedule(config: Config, instance_id: str = "") -> ScheduleInstance:
    from functions.schedule.instance import ScheduleInstance
    return ScheduleInstance(await connect(config, instance_id or new_id("schedule"), "schedule"),
                            config.schedule)


async def route(config: Config, instance_id: str = "") -> RouteInstance:
    from functions.route.instance import RouteInstance
    from kernel.store import Store

    return RouteInstance(await connect(config, instance_id or new_id("route"), "route"),
                         Store.from_url(config.redis_url))


async def central(config: Config, instance_id: str = "") -> CentralScheduler:
    """The central baseline of the scheduler benchmark."""
    from functions.schedule.baselines import CentralScheduler

    return CentralScheduler(await connect(config, instance_id or new_id("central"), "bench"))


async def central_indexed(config: Config, instance_id: str = "") -> CentralScheduler:
    """The strongest central baseline: one process, the partitions' free-capacity index."""
    from functions.schedule.baselines import CentralScheduler

    return CentralScheduler(
        await connect(config, instance_id or new_id("central"), "bench"), strategy="indexed"
    )


async def kube_scheduler(config: Config, instance_id: str = "") -> CentralScheduler:
    """The kube-scheduler baseline: filter until percentageOfNodesToScore, score those."""
    from functions.schedule.baselines import CentralScheduler

    return CentralScheduler(
        await connect(config, instance_id or new_id("central"), "bench"), strategy="kube"
    )


async def sampling(config: Config, instance_id: str = "") -> SamplingScheduler:
    """The sampling baseline of the scheduler benchmark."""
    from functions.schedule.baselines import SamplingScheduler

    s = config.schedule
    return SamplingScheduler(await connect(config, instance_id or new_id("sampling"), "bench"),
                             d=s.sampling_d, max_tries=s.sampling_max_tries, seed=s.sampling_seed)


INSTANCES: dict[str, Callable[[Config, str], Awaitable[Component]]] = {
    "scale": scale, "schedule": schedule, "route": route,
    "central": central, "sampling": sampling,
    "central-indexed": central_indexed, "kube-scheduler": kube_scheduler,
}


async def instance(kind: str, config: Config, instance_id: str = "") -> Component:
    try:
        make = INSTANCES[kind]
    except KeyError:
        raise ValueError(f"unknown instance kind {kind!r}; one of {', '.join(INSTANCES)}"
                         ) from None
    return await make(config, instance_id)


# ---- the other components --------------------------------------------------------------------


async def activator(config: Config) -> Activator:
    from activator.server import Activator
    from kernel.store import Store

    # API keys on: the gateway reads keys and keeps their buckets in Redis.
    store = Store.from_url(config.redis_url) if config.activator.keys.enabled else None
    return Activator(await connect(config, new_id("activator"), "activator"), config.activator,
                     store=store)


class Coordinated(Component):
    """The coordinator and the registry share one Redis store, opened and closed here."""

    def __init__(self, coordinator: Coordinator, registry: Registry, store: Store,
                 runtime: Runtime | None) -> None:
        super().__init__(coordinator.bus)
        self.coordinator, self.registry, self.store = coordinator, registry, store
        self.runtime = runtime

    async def start(self) -> None:
        start_runtime = getattr(self.runtime, "start", None)
        if start_runtime is not None:
            # Before the coordinator: it starts from the instances that already run.
            await start_runtime()
        await self.store.check_schema()  # before anything reads what Redis holds
        await self.registry.start()
        await self.coordinator.start()

    async def stop(self) -> None:
        await self.coordinator.stop()
        await self.registry.stop()
        await self.store.close()


async def coordinator(config: Config, *, public_url: str, runtime: Runtime | None = None,
                      store: Store | None = None) -> Coordinated:
    from controlplane.coordinator import Coordinator
    from controlplane.registry import Registry
    from kernel.store import Store
    store = store or Store.from_url(config.redis_url)
    coord = Coordinator(await connect(config, new_id("coordinator"), "coordinator"), store,
                        config.coordinator,
                        runtime=runtime)
    registry = Registry(await connect(config, new_id("registry"), "coordinator"), store,
                        public_url=public_url, model_policy=model_policy(config),
                        revision_history=config.coordinator.revision_history)
    return Coordinated(coord, registry, store, runtime)


async def local_nodes(config: Config, *, log_dir: Path) -> list[LocalNode]:
    from partitions.agents.local import LocalNode
    from partitions.agents.podusers import PodUsers
    from partitions.modelcache.store import ModelCache
    nodes = config.nodes
    pod_users = PodUsers(nodes.pod_user, workdir=nodes.workdir)  # one pod user for all
    gpus = nodes.capacity.gpu
    policy = model_policy(config)
    cache_dir = nodes.model_cache_dir or Path(config.state_dir) / "models"

    def cache(name: str) -> ModelCache:
        # One cache per node, as on separate machines: locality is per node.
        return ModelCache(cache_dir / name, capacity_bytes=nodes.node_cache_bytes,
                          policy=policy)

    return [
        LocalNode(await connect(config, f"node-{i}", "node"),
                  # The local nodes share this machine's GPUs: each has its own slice of
                  # the device indices, so no two nodes hand out the same GPU.
                  NodeInfo(name=f"node-{i}", capacity=nodes.capacity, backend="local",
                           gpu_devices=list(range(i * gpus, (i + 1) * gpus))),
                  workdir=nodes.workdir, log_dir=log_dir, pod_users=pod_users,
                  pod_nice=nodes.pod_nice, cache=cache(f"node-{i}"))
        for i in range(nodes.count)
    ]


def model_policy(config: Config) -> UriPolicy:
    """Which storage URIs nodes fetch, from the configuration: the registry checks a
    deploy against the same policy the nodes apply."""
    from partitions.modelcache.policy import ModelUriError, policy_from
    n = config.nodes
    try:
        return policy_from(model_root=n.model_root, state_dir=Path(config.state_dir),
                           hosts=n.model_hosts, max_bytes=n.model_max_bytes,
                           timeout_s=n.model_fetch_timeout_s)
    except ModelUriError as exc:
        raise ConfigError(str(exc)) from None


async def kubernetes_nodes(config: Config, kube: KubernetesConfig) -> KubernetesBackend:
    from partitions.agents.kubernetes.agent import KubernetesBackend
    return KubernetesBackend(await connect(config, "node-kubernetes", "node"), kube)


async def operator(config: Config, op: OperatorConfig) -> FnServiceOperator:
    from controlplane.operator import FnServiceOperator
    return FnServiceOperator(await connect(config, "operator", "operator"), op)
